"""``segquant quantize`` records the new artifact's fidelity against fp in eval.json, as a worker's build does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from segquant_cli.main import main

segquant_shapes = pytest.importorskip("segquant_shapes")


def test_quantize_writes_eval_json_next_to_the_artifact(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pipe_dir = tmp_path / "tiny-mmdit"
    segquant_shapes.tiny_random_pipeline("mmdit", seed=0).save_pretrained(pipe_dir)
    out = tmp_path / "art"
    rc = main(
        [
            "quantize",
            str(pipe_dir),
            "--recipe",
            "w8a8-segquant",
            "--out",
            str(out),
            "--calib-samples",
            "2",
            "--steps",
            "2",
            "--steps-per-prompt",
            "1",
            "--eval-prompts",
            "3",
        ]
    )
    assert rc == 0
    report = json.loads((out / "eval.json").read_text())
    assert report["eval_prompt_count"] == 3 and report["seeds"] == [0] and report["num_inference_steps"] == 2
    assert not set(report["eval_prompts"]) & set(report.get("calibration_prompts", []))
    entry = report["variants"][0]
    assert entry["variant"] == "w8a8-segquant" and 0 < entry["ssim"] <= 1 and entry["latent_mse"] >= 0
    assert "shape" in entry["adherence"]  # the Shapes pipelines score prompt adherence
    assert "fidelity against fp on 3 prompts" in capsys.readouterr().out


def test_quantize_can_skip_the_evaluation(tmp_path: Path) -> None:
    pipe_dir = tmp_path / "tiny-mmdit"
    segquant_shapes.tiny_random_pipeline("mmdit", seed=0).save_pretrained(pipe_dir)
    out = tmp_path / "art"
    assert (
        main(
            [
                "quantize",
                str(pipe_dir),
                "--recipe",
                "w8a8-segquant",
                "--out",
                str(out),
                "--calib-samples",
                "1",
                "--steps",
                "1",
                "--steps-per-prompt",
                "1",
                "--eval-prompts",
                "0",
            ]
        )
        == 0
    )
    assert (out / "manifest.json").is_file() and not (out / "eval.json").exists()
    assert (
        main(["quantize", str(pipe_dir), "--recipe", "w8a8-segquant", "--out", str(out), "--eval-prompts", "-1"]) == 2
    )
