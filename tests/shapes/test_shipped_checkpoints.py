"""The shipped quantized checkpoints are what today's engine builds, load without the float denoiser, and
are what the embedded default serves. Rebuild them with ``python -m segquant_cli.shipped_checkpoints``."""

from __future__ import annotations

import pytest
import torch

import segquant_core as sq
import segquant_shapes
from segquant_cli import shipped_checkpoints as shipped
from segquant_core.witness import witness_matches
from service.registry import Registry

CASES = [(m, r) for m in shipped.MODELS for r in shipped.RECIPES]
REBUILD = "rebuild with: python -m segquant_cli.shipped_checkpoints"


@pytest.mark.parametrize("model,recipe", CASES)
def test_shipped_checkpoint_is_current(model, recipe):
    status = shipped.status(model, recipe)
    assert status, f"{model}/{recipe}: {status.reason}; {REBUILD}"


@pytest.mark.parametrize("model,recipe", CASES)
def test_witness_layer_rebuilds_bit_identically(model, recipe):
    torch.set_num_threads(1)
    d = shipped.checkpoint_dir(model, recipe)
    pipe = segquant_shapes.load_shipped(model)
    linear = sq.denoiser_of(pipe).get_submodule(shipped.WITNESS_LAYERS[model])
    ok, why = witness_matches(d, linear)
    assert ok, f"{model}/{recipe}: {why}; the engine's numerics changed: bump ENGINE_NUMERICS and {REBUILD}"


@pytest.mark.parametrize("model,recipe", CASES)
def test_shipped_checkpoint_is_small_and_generates(model, recipe):
    d = shipped.checkpoint_dir(model, recipe)
    assert sum(f.stat().st_size for f in d.iterdir()) < 12e6
    pipe = segquant_shapes.load_shipped(model)
    sq.replace_denoiser(pipe, sq.load_denoiser(d))
    with torch.no_grad():
        image = pipe(
            ["a red circle"], num_inference_steps=2, output_type="pt", generator=[torch.Generator().manual_seed(0)]
        ).images
    assert image.shape[-1] == 32 and torch.isfinite(image).all()


def test_embedded_default_serves_the_shipped_checkpoints():
    model = Registry.default().model(None)
    for recipe in shipped.RECIPES:
        assert model.variant(recipe).artifact == shipped.checkpoint_dir("mmdit", recipe)
