"""`segquant eval` on a tiny random model: every metric computed, fp vs fp identical, files written."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from segquant_cli.main import main

segquant_shapes = pytest.importorskip("segquant_shapes")


def test_eval_tiny_model_reports_all_metrics(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pipe_dir = tmp_path / "tiny"
    segquant_shapes.tiny_random_pipeline("mmdit", seed=0).save_pretrained(pipe_dir)
    out = tmp_path / "report"
    rc = main(
        [
            "eval",
            str(pipe_dir),
            "--variants",
            "fp,w8a8,w8a8-smooth:seg=on+dual=on",
            "--num-prompts",
            "2",
            "--seeds",
            "0,1",
            "--steps",
            "3",
            "--calib-samples",
            "4",
            "--steps-per-prompt",
            "2",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["eval_prompt_count"] == 2 and report["calibration_prompt_count"] == 2
    assert report["calibration_samples"] == 4
    assert not set(report["eval_prompts"]) & set(segquant_shapes.calibration_prompts(64))
    by_name = {v["variant"]: v for v in report["variants"]}
    assert list(by_name) == ["fp", "w8a8", "w8a8-smooth:seg=on+dual=on"]
    fp = by_name["fp"]
    assert math.isinf(fp["psnr"]) and fp["ssim"] == pytest.approx(1.0) and fp["latent_mse"] == 0.0
    for name in ("w8a8", "w8a8-smooth:seg=on+dual=on"):
        v = by_name[name]
        assert math.isfinite(v["psnr"]) and v["psnr"] > 10
        assert 0 < v["ssim"] < 1 and v["latent_mse"] > 0
        assert v["weight_bytes"] < v["float_weight_bytes"]
    for v in by_name.values():
        assert set(v["adherence"]) >= {"background", "color", "position", "shape"}
    table = (out / "report.md").read_text()
    assert "| fp |" in table and "∞" in table and "2 evaluation prompts × 2 seeds" in table
    assert (out / "grid.png").stat().st_size > 0
    assert "wrote" in capsys.readouterr().out


def test_eval_rejects_overlapping_prompt_sets(tmp_path: Path) -> None:
    from segquant_core.eval import evaluate

    with pytest.raises(ValueError, match="disjoint"):
        evaluate(lambda: None, ["fp"], ["a red circle"], [0], calibration_prompts=["a red circle"])


def test_eval_leaves_prompts_the_analyser_cannot_read_unscored(tmp_path: Path) -> None:
    """A prompt without a position cannot be scored for adherence; it still gets PSNR/SSIM (issue 16 item 7)."""
    pipe_dir = tmp_path / "tiny"
    segquant_shapes.tiny_random_pipeline("mmdit", seed=0).save_pretrained(pipe_dir)
    prompts = tmp_path / "prompts.txt"
    readable = "a small red circle in the top left on a blue background"
    unreadable = "a red circle on a white background"
    prompts.write_text(f"{readable}\n{unreadable}\n")
    out = tmp_path / "report"
    rc = main(
        [
            "eval",
            str(pipe_dir),
            "--variants",
            "fp,w8a8",
            "--prompts",
            str(prompts),
            "--seeds",
            "0",
            "--steps",
            "2",
            "--calib-samples",
            "2",
            "--steps-per-prompt",
            "1",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["eval_prompts"] == [readable, unreadable]
    assert report["unscored_prompts"] == [unreadable]
    for v in report["variants"]:
        assert set(v["adherence"]) >= {"background", "color", "position", "shape"}
    w8a8 = next(v for v in report["variants"] if v["variant"] == "w8a8")
    assert math.isfinite(w8a8["psnr"]) and 0 < w8a8["ssim"] < 1
