"""The fused Triton kernel, run on CPU under Triton's interpreter in a subprocess.

``TRITON_INTERPRET=1`` must be set before triton is first imported, so the checks live in
``triton_interpreter_cases.py`` and run in a fresh interpreter: int8 results exact against an int32
reference, and every SegLinear flavour (segments in/out, ragged, DualScale, smoothing, int4, low-rank)
within 1e-3 of the fake-quant reference.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")


def test_fused_kernel_under_interpreter() -> None:
    script = Path(__file__).with_name("triton_interpreter_cases.py")
    env = {**os.environ, "TRITON_INTERPRET": "1", "SEGQUANT_COMPILE": "0"}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "exact int32 GEMM: ok" in proc.stdout
    assert "fused kernel vs reference" in proc.stdout
    assert "dynamic activations refused" in proc.stdout
