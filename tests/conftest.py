"""Suite-wide settings: no network for model loading, eager activation quantizers by default.

Compiling the fused activation quantizers costs tens of seconds per process on 2 cores; the suite runs
them eagerly (same arithmetic) except in ``tests/core/test_fused_quant.py``, which compiles them on purpose.
"""

import os

os.environ.setdefault("SEGQUANT_COMPILE", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    """Print the random-order seed even under ``-q`` (which hides pytest-randomly's header line)."""
    seed = getattr(config.option, "randomly_seed", None)
    if isinstance(seed, int):
        terminalreporter.write_line(f"test order: random, seed {seed} (repeat it with --randomly-seed={seed})")
