"""``segquant bench pipeline``: prebuilt checkpoints are timed as served, missing folders are one readable error."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from segquant_cli.shipped_checkpoints import checkpoint_dir
from segquant_core.api import load_denoiser, resident_bytes


def _bench(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "segquant_cli", "bench", "pipeline", "--model", "shipped:mmdit"]
    cmd += ["--variants", "w8a8-segquant", "--batch", "1", "--steps", "2", "--rounds", "1"]
    return subprocess.run(
        [*cmd, "--json", str(tmp_path / "b.json"), *extra], capture_output=True, text=True, timeout=600
    )


def test_shipped_variants_load_their_checkpoint_instead_of_calibrating(tmp_path: Path) -> None:
    proc = _bench(tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {r["variant"]: r for r in json.loads((tmp_path / "b.json").read_text())["rows"]}
    assert rows["fp"]["checkpoint"] == "float"
    served = rows["w8a8-segquant"]
    assert served["checkpoint"] == "prebuilt"
    assert f"w8a8-segquant ({checkpoint_dir('mmdit', 'w8a8-segquant')})" in proc.stderr
    # the shipped checkpoint's weights and scales, plus the kernels' packed copies made on the first call
    assert served["denoiser_bytes"] >= resident_bytes(load_denoiser(checkpoint_dir("mmdit", "w8a8-segquant")))
    assert served["vs_fp"] > 0


def test_a_missing_checkpoint_folder_is_one_readable_error(tmp_path: Path) -> None:
    proc = _bench(tmp_path, "--checkpoints", str(tmp_path / "nowhere"))
    assert proc.returncode != 0
    assert "--checkpoints" in proc.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "b.json").exists()
