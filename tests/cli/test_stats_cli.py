"""``segquant stats`` end to end on a tiny random Flux-style pipeline: capture from its own loop, detect, measure."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from segquant_cli.main import main

segquant_shapes = pytest.importorskip("segquant_shapes")


def test_stats_of_a_tiny_flux_pipeline_reports_proj_out_per_segment(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "tiny-flux"
    segquant_shapes.tiny_random_pipeline("flux", seed=0).save_pretrained(folder)
    out = tmp_path / "stats.json"
    argv = ["stats", str(folder), "--calib-samples", "2", "--steps-per-prompt", "2", "--steps", "2", "--json", str(out)]
    assert main(argv) == 0
    assert "AdaLN chunk ranges" in capsys.readouterr().out
    record = json.loads(out.read_text())
    assert record["calibration"]["samples"] == 2
    assert record["summary"]["adaln_layers"] > 0 and record["summary"]["head_layers"] > 0
    proj_out = [t for t in record["tails"] if t["layer"].endswith("single_transformer_blocks.0.proj_out")]
    # attention | GELU-MLP: one tail per in-segment, DualScale (GELU) on the MLP segment only
    assert [(t["segment"], t["dual"], t["source"]) for t in proj_out] == [(0, False, ""), (1, True, "GELU")]
    assert proj_out[1]["neg_min"] >= -0.1701
