"""A recorded calibration written to disk reads back as the same calls (bit for bit) and builds the same
manifest entry; a file recorded under another key (other weights or settings) is not used."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import segquant_core as sq
import segquant_shapes
from segquant_cli.calibration_cache import calibration_key, load_calibration, save_calibration


@pytest.fixture(scope="module")
def calib() -> sq.CalibrationSet:
    """Four recorded calls of the tiny Flux-style pipeline (two prompts x two of three steps)."""
    pipe = segquant_shapes.tiny_random_pipeline("flux", seed=0)
    return sq.capture_calibration(
        pipe,
        ["a red circle", "a blue square"],
        num_inference_steps=3,
        steps_per_prompt=2,
        guidance_scale=3.0,
        seed=0,
        call_kwargs={"height": 32, "width": 32},
        progress=False,
    )


def _same(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def test_round_trip_gives_the_same_calls(calib: sq.CalibrationSet, tmp_path: Path) -> None:
    key = calibration_key({"samples": len(calib)}, "weights-hash")
    path = save_calibration(calib, tmp_path / "flux.safetensors", key)
    stored = load_calibration(path, key)
    assert stored is not None and len(stored) == len(calib) == 4
    assert _same(stored.calls, calib.calls)
    assert stored.describe() == calib.describe()  # what the checkpoint's manifest records
    assert not list(tmp_path.glob(".*partial"))


def test_another_key_is_not_used(calib: sq.CalibrationSet, tmp_path: Path) -> None:
    path = save_calibration(calib, tmp_path / "flux.safetensors", calibration_key({"seed": 0}, "w1"))
    assert load_calibration(path, calibration_key({"seed": 0}, "w2")) is None  # the weights changed
    assert load_calibration(path, calibration_key({"seed": 1}, "w1")) is None  # the settings changed
    assert load_calibration(tmp_path / "missing.safetensors", "k") is None
