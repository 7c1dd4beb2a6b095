"""`segquant plan | quantize | eval | export-onnx --check` on tiny stock diffusers pipelines (SD3 with and
without T5, Flux, SDXL, PixArt-Σ), as a new user runs them on a folder written by ``save_pretrained``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from segquant_cli.main import main
from segquant_core.prompts import general_calibration_prompts, general_eval_prompts
from tests.stock.conftest import KINDS

SIZE = ["--height", "32", "--width", "32"]  # a multiple of every stock pipeline's step (Flux: 16)
FAST_CALIB = ["--calib-samples", "2", "--steps", "2", "--steps-per-prompt", "1", "--eval-prompts", "0"]
DENOISER = {"sdxl": "unet"}


@pytest.mark.parametrize("kind", KINDS)
def test_plan_quantize_export_on_a_stock_pipeline(
    kind: str, stock_dirs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = stock_dirs[kind]
    assert main(["plan", str(folder), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan and any(r["segments"] for r in plan)  # AdaLN / timestep chunks are found on every kind

    for recipe in ("w8a8-segquant", "w4a8-segquant"):
        out = tmp_path / recipe
        assert (
            main(
                [
                    "quantize",
                    str(folder),
                    "--recipe",
                    recipe,
                    "--out",
                    str(out),
                    *FAST_CALIB,
                    *SIZE,
                    "--guidance",
                    "3.0",
                ]
            )
            == 0
        )
        printed = capsys.readouterr().out
        assert "default general-purpose calibration set" in printed  # one line says where the prompts came from
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["source"]["component"] == DENOISER.get(kind, "transformer")
        cal = manifest["calibration"]
        assert (cal["height"], cal["width"], cal["num_inference_steps"], cal["guidance_scale"]) == (32, 32, 2, 3.0)

    report = tmp_path / "onnx.json"
    rc = main(
        [
            "export-onnx",
            str(tmp_path / "w8a8-segquant"),
            "--out",
            str(tmp_path / "m.onnx"),
            "--check",
            "--rounds",
            "1",
            "--example-size",
            "8x8",
            "--json",
            str(report),
        ]
    )
    assert rc == 0, capsys.readouterr()
    check = json.loads(report.read_text())["check"]
    assert check["passed"] and check["rel_error"] < 1e-2


@pytest.mark.parametrize("kind", ["sd3-no-t5", "flux", "sdxl"])
def test_eval_on_a_stock_pipeline_uses_the_general_prompt_sets(
    kind: str, stock_dirs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "report"
    rc = main(
        [
            "eval",
            str(stock_dirs[kind]),
            "--variants",
            "fp,w8a8-segquant",
            "--num-prompts",
            "2",
            "--seeds",
            "0",
            "--steps",
            "2",
            "--calib-samples",
            "2",
            "--steps-per-prompt",
            "1",
            *SIZE,
            "--guidance",
            "2.0",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "default general-purpose evaluation set" in printed
    data = json.loads((out / "report.json").read_text())
    assert (data["height"], data["width"], data["guidance_scale"]) == (32, 32, 2.0)
    assert data["eval_prompts"] == general_eval_prompts()[:2]
    assert not set(data["eval_prompts"]) & set(general_calibration_prompts())
    w8 = data["variants"][1]
    assert w8["variant"] == "w8a8-segquant" and w8["psnr"] > 20
    from PIL import Image

    with Image.open(out / "grid.png") as grid:
        assert grid.size == (2 * 128, 14 + 2 * 128)  # 32 px images enlarged 4×, 2 variants × 2 prompts


def test_quantize_a_bare_transformer_folder_records_transformer(
    stock_dirs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 14 item 4: the component was recorded as 'unet', so export-onnx --model <pipeline> failed."""
    transformer = stock_dirs["sd3"] / "transformer"
    out = tmp_path / "art"
    assert (
        main(["quantize", str(transformer), "--recipe", "w8a8-segquant", "--out", str(out), "--calib-samples", "2"])
        == 0
    )
    assert json.loads((out / "manifest.json").read_text())["source"]["component"] == "transformer"
    capsys.readouterr()
    assert (
        main(
            [
                "export-onnx",
                str(out),
                "--model",
                str(stock_dirs["sd3"]),
                "--out",
                str(tmp_path / "m.onnx"),
                "--example-size",
                "8x8",
            ]
        )
        == 0
    )


def test_drop_components_flag_and_its_errors(
    stock_dirs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "art"
    assert (
        main(
            [
                "quantize",
                str(stock_dirs["sd3"]),
                "--recipe",
                "w8a8-segquant",
                "--out",
                str(out),
                *FAST_CALIB,
                *SIZE,
                "--drop-components",
                "text_encoder_3",
            ]
        )
        == 0
    )
    assert json.loads((out / "manifest.json").read_text())["source"]["drop_components"] == ["text_encoder_3"]
    capsys.readouterr()
    for bad, reason in (("text_encoder_9", "is not a component"), ("vae", "cannot be dropped")):
        rc = main(["plan", str(stock_dirs["sd3"]), "--drop-components", bad])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and err[0].startswith("segquant: error: --drop-components:")
        assert reason in err[0] and bad in err[0]
