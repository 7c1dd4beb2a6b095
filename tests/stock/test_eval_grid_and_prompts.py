"""The eval sheet scales with the image size and keeps memory bounded; the default prompt sets; calibration
on a stock pipeline prints our progress, not the pipeline's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from segquant_core.eval.grid import MAX_SIDE, cell_size
from segquant_core.eval.harness import Generations
from segquant_core.eval.report import grid_image
from segquant_core.eval.runner import EvalReport, VariantResult, shrink_to_grid
from segquant_core.prompts import choose_prompts, general_calibration_prompts, general_eval_prompts

VARIANTS = ["fp", "w8a8", "w8a8-smooth", "w8a8-segquant"]


def _report(side: int, prompts: int, seeds: list[int]) -> EvalReport:
    names = [f"prompt {i}" for i in range(prompts)]
    report = EvalReport("m", [], names, [], seeds, 2, 3.0, 0)
    for v in VARIANTS:
        gen = Generations(names, seeds)
        for pi in range(prompts):
            for s in seeds:
                gen.images[(pi, s)] = Image.new("RGB", (side, side), (pi * 7 % 256, s, 0))
        report.generations[v] = gen
        report.variants.append(VariantResult(v, 0.0, 0.0, 0.0, None, 0.0, 0.0, None, None))
    return report


def test_small_images_are_enlarged_4x() -> None:
    assert cell_size(32, 32, columns=4, rows=16) == (128, 128)
    assert grid_image(_report(32, 3, [0])).size == (4 * 128, 14 + 3 * 128)


def test_a_1024px_eval_sheet_stays_within_4096px_and_memory_stays_bounded() -> None:
    """Issue 14 item 5: 4× enlargement made an 8192×16398 sheet at 1024² (Pillow's limit at eval defaults)."""
    report = _report(1024, 32, [0, 1])
    for name in VARIANTS:
        shrink_to_grid(report.generations[name], len(VARIANTS))
        gen = report.generations[name]
        assert len(gen.images) == 16  # only what the sheet shows: first seed, 16 rows
        assert all(max(im.size) <= MAX_SIDE // 4 for im in gen.images.values())
        held = sum(im.width * im.height * 3 for im in gen.images.values())
        assert held < 1024 * 1024 * 3 * 16 // 8  # far below the 16 full-size images it replaces
    sheet = grid_image(report)
    assert max(sheet.size) <= MAX_SIDE and sheet.width == 4 * 255  # 16 rows of 255 px fill the height


def test_default_prompt_sets_are_big_varied_and_disjoint() -> None:
    calib, evals = general_calibration_prompts(), general_eval_prompts()
    assert len(calib) == len(set(calib)) == 256 and len(evals) == len(set(evals)) == 64
    assert not set(calib) & set(evals)
    assert any('"' in p for p in calib) and any('"' in p for p in evals)  # text in images
    lines: list[str] = []
    assert choose_prompts(object(), 10, log=lines.append) == calib[:10]
    assert lines == ["calibration prompts: 10 distinct from the default general-purpose calibration set"]


def test_calibration_silences_the_pipelines_progress_bars(
    stock_dirs: dict[str, Path], capfd: pytest.CaptureFixture[str]
) -> None:
    import segquant_core as sq
    from segquant_cli.models import load_pipeline

    pipe = load_pipeline(stock_dirs["sd3-no-t5"])
    capfd.readouterr()
    calib = sq.capture_calibration(
        pipe,
        ["a cat", "a dog"],
        num_inference_steps=3,
        steps_per_prompt=1,
        call_kwargs={"height": 32, "width": 32},
        progress=False,
    )
    assert len(calib) == 2 and calib.describe()["height"] == 32
    err = capfd.readouterr().err
    assert "it/s" not in err and "%|" not in err, err  # no diffusers progress bar per calibration prompt
    with torch.no_grad():
        pipe("a cat", num_inference_steps=1, height=32, width=32)
    assert "%|" in capfd.readouterr().err  # the user's own setting comes back afterwards
