"""Issue #2 acceptance: a tiny SD3-style pipeline quantized with w8a8-segquant on the CPU int8 backend
generates an image, saves, reloads in a fresh process and reproduces the same image bit-for-bit."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import segquant_core as sq

segquant_shapes = pytest.importorskip("segquant_shapes")

PROMPTS = [
    "a small red circle in the top left on a blue background",
    "a large green square in the center on a black background",
]
CALIB = [
    "a large yellow triangle in the bottom right on a white background",
    "a small purple circle in the bottom left on an orange background",
]


def _image_digest(pipe) -> tuple[str, np.ndarray]:
    gens = [torch.Generator().manual_seed(s) for s in (0, 1)]
    images = pipe(PROMPTS, num_inference_steps=4, guidance_scale=3.0, generator=gens, output_type="np").images
    arr = np.ascontiguousarray(images)
    return hashlib.sha256(arr.tobytes()).hexdigest(), arr


RELOAD_SCRIPT = """
import hashlib, sys, numpy as np, torch
import segquant_core as sq
from segquant_shapes import load_pipeline
pipe = load_pipeline(sys.argv[1])
result = sq.load_into_pipeline(sys.argv[2], pipe)
gens = [torch.Generator().manual_seed(s) for s in (0, 1)]
prompts = {prompts!r}
images = pipe(prompts, num_inference_steps=4, guidance_scale=3.0, generator=gens, output_type="np").images
print(hashlib.sha256(np.ascontiguousarray(images).tobytes()).hexdigest())
print(",".join(sorted(result.backends)))
"""


def test_w8a8_segquant_pipeline_roundtrip_bit_exact_in_fresh_process(tmp_path: Path) -> None:
    pipe = segquant_shapes.tiny_random_pipeline("mmdit", seed=0)
    pipe.set_progress_bar_config(disable=True)
    _, fp_images = _image_digest(pipe)
    pipe_dir = tmp_path / "pipe"
    pipe.save_pretrained(pipe_dir)

    result = sq.quantize_pipeline(
        pipe, "w8a8-segquant", CALIB, num_inference_steps=4, steps_per_prompt=2, guidance_scale=3.0, progress=False
    )
    assert result.backends == {"cpu-onednn-int8": len(result.layers)}, result.backends
    summary = result.summary()
    assert summary["segmented_layers"] > 0 and summary["dual_scale_layers"] > 0
    digest, q_images = _image_digest(pipe)
    assert q_images.shape == fp_images.shape
    # quantized ≠ float, but close to it
    assert not np.array_equal(q_images, fp_images)
    assert float(np.abs(q_images - fp_images).mean()) < 0.1

    art = tmp_path / "artifact"
    sq.save(sq.denoiser_of(pipe), art, source={"path": str(pipe_dir)})
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["calibration"]["samples"] == 4 and manifest["source"]["path"] == str(pipe_dir)

    out = subprocess.run(
        [sys.executable, "-c", RELOAD_SCRIPT.format(prompts=PROMPTS), str(pipe_dir), str(art)],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    lines = out.stdout.strip().splitlines()
    assert lines[-2] == digest, "reloaded artifact does not reproduce the image bit-for-bit"
    assert lines[-1] == "cpu-onednn-int8"
