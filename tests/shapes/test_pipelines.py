"""Pipeline contract the serving layer relies on, checked on tiny random-weight pipelines."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, SD3Transformer2DModel, UNet2DConditionModel
from PIL import Image

from segquant_shapes import ShapesMMDiTPipeline, ShapesUNetPipeline, load_pipeline

PROMPTS = ["a small red circle in the top left on a blue background", "a big green box, center, white backdrop"]


def _gens(*seeds: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


@pytest.fixture(params=["mmdit", "unet", "flux"])
def pipe(request, tiny_mmdit, tiny_unet, tiny_flux):
    return {"mmdit": tiny_mmdit, "unet": tiny_unet, "flux": tiny_flux}[request.param]


def test_stock_denoiser_classes_and_size(tiny_mmdit, tiny_unet) -> None:
    assert type(tiny_mmdit.transformer) is SD3Transformer2DModel
    assert type(tiny_unet.unet) is UNet2DConditionModel
    for p in (tiny_mmdit, tiny_unet):
        n = sum(x.numel() for x in p.denoiser.parameters())
        assert 50_000 < n < 1_000_000


def test_output_types(pipe) -> None:
    def kw() -> dict:
        return dict(num_inference_steps=2, generator=_gens(0))

    pil = pipe(PROMPTS[0], **kw()).images
    assert isinstance(pil[0], Image.Image) and pil[0].size == (32, 32)
    arr = pipe(PROMPTS[0], output_type="np", **kw()).images
    assert arr.shape == (1, 32, 32, 3) and arr.min() >= 0 and arr.max() <= 1
    pt = pipe(PROMPTS[0], output_type="pt", **kw()).images
    assert pt.shape == (1, 3, 32, 32)
    lat = pipe(PROMPTS[0], output_type="latent", **kw()).images
    assert lat.shape == (1, 3, 32, 32)
    tup = pipe(PROMPTS[0], output_type="np", return_dict=False, **kw())
    np.testing.assert_array_equal(tup[0], arr)


def test_prompt_list_and_images_per_prompt(pipe) -> None:
    out = pipe(PROMPTS, num_images_per_prompt=2, num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert len(out.images) == 4
    out = pipe(PROMPTS, negative_prompt=["a black square", "a red dot"], num_inference_steps=2, guidance_scale=4.0)
    assert len(out.images) == 2


def test_per_sample_generators_batched_equals_alone(pipe) -> None:
    batched = pipe(PROMPTS, generator=_gens(11, 22), num_inference_steps=4, output_type="np").images
    for i, (p, s) in enumerate(zip(PROMPTS, (11, 22))):
        alone = pipe(p, generator=_gens(s), num_inference_steps=4, output_type="np").images[0]
        np.testing.assert_allclose(batched[i], alone, atol=1e-5)
    pil_b = pipe(PROMPTS, generator=_gens(11, 22), num_inference_steps=4).images
    pil_a = pipe(PROMPTS[1], generator=_gens(22), num_inference_steps=4).images
    # Float results agree to ~1e-6 (CPU GEMM blocking depends on batch size), so uint8 pixels may differ
    # by at most one rounding step.
    diff = np.abs(np.asarray(pil_b[1], dtype=np.int16) - np.asarray(pil_a[0], dtype=np.int16))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01


def test_generator_count_must_match(pipe) -> None:
    with pytest.raises(ValueError):
        pipe(PROMPTS, generator=_gens(1), num_inference_steps=2)


def test_callback_called_every_step_and_exceptions_propagate(pipe) -> None:
    calls: list[tuple[int, float]] = []

    def cb(p, i, t, kwargs):
        assert p is pipe and "latents" in kwargs
        calls.append((i, float(t)))
        return {}

    pipe(PROMPTS[0], num_inference_steps=5, callback_on_step_end=cb)
    assert [i for i, _ in calls] == list(range(5))
    assert calls[0][1] > calls[-1][1]

    class Cancelled(RuntimeError):
        pass

    def cancel(p, i, t, kwargs):
        if i == 1:
            raise Cancelled("stop")
        return {}

    with pytest.raises(Cancelled):
        pipe(PROMPTS[0], num_inference_steps=5, callback_on_step_end=cancel)


def test_cfg_batches_cond_and_uncond_in_one_call(tiny_mmdit) -> None:
    batch_sizes: list[int] = []
    hook = tiny_mmdit.transformer.register_forward_hook(
        lambda m, a, kw, o: batch_sizes.append(kw["hidden_states"].shape[0]), with_kwargs=True
    )
    try:
        tiny_mmdit(PROMPTS, num_inference_steps=3, guidance_scale=3.0)
        tiny_mmdit(PROMPTS, num_inference_steps=2, guidance_scale=1.0)
    finally:
        hook.remove()
    assert batch_sizes == [4, 4, 4, 2, 2]


@pytest.mark.parametrize("kind", ["mmdit", "unet"])
def test_save_load_round_trip(kind: str, tmp_path: Path, tiny_mmdit, tiny_unet) -> None:
    pipe = tiny_mmdit if kind == "mmdit" else tiny_unet
    pipe.save_pretrained(tmp_path)
    names = sorted(p.name for p in tmp_path.iterdir())
    denoiser = "transformer" if kind == "mmdit" else "unet"
    assert names == sorted(["model_index.json", "scheduler", denoiser])
    assert sorted(p.name for p in (tmp_path / denoiser).iterdir()) == [
        "config.json",
        "diffusion_pytorch_model.safetensors",
    ]
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert "text_encoder" not in index
    cls = ShapesMMDiTPipeline if kind == "mmdit" else ShapesUNetPipeline
    ref = pipe(PROMPTS[0], generator=_gens(5), num_inference_steps=3, output_type="np").images
    for loaded in (
        cls.from_pretrained(tmp_path),
        DiffusionPipeline.from_pretrained(tmp_path, local_files_only=True),
        load_pipeline(tmp_path),
    ):
        assert type(loaded) is cls
        loaded.set_progress_bar_config(disable=True)
        out = loaded(PROMPTS[0], generator=_gens(5), num_inference_steps=3, output_type="np").images
        np.testing.assert_array_equal(out, ref)


def test_latents_argument_and_bad_sizes(tiny_mmdit) -> None:
    lat = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    a = tiny_mmdit(PROMPTS[0], latents=lat, num_inference_steps=2, output_type="np").images
    b = tiny_mmdit(PROMPTS[0], generator=_gens(3), num_inference_steps=2, output_type="np").images
    np.testing.assert_allclose(a, b, atol=1e-6)
    with pytest.raises(ValueError):
        tiny_mmdit(PROMPTS[0], height=31, num_inference_steps=1)
    with pytest.raises(ValueError):
        tiny_mmdit(PROMPTS[0], output_type="bogus", num_inference_steps=1)
