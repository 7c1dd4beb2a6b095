"""The Flux-style shapes model: pixel packing, RoPE ids, stock blocks, save/load, training and loading by name."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, FluxTransformer2DModel
from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock

from segquant_shapes import ShapesFluxPipeline, load_pipeline, shipped_pipeline_path
from segquant_shapes.data import generate_examples
from segquant_shapes.flux import flux_config, image_ids, pack_pixels, unpack_pixels
from segquant_shapes.models import PRESETS, build_denoiser, denoiser_kind, predict_velocity
from segquant_shapes.text_encoder import TEXT_DIM, encode_prompts
from segquant_shapes.train import TrainConfig, init_from_pipeline, make_optimizer, train_step

PROMPT = "a large red square in the top left on a blue background"


def test_packing_round_trips_and_groups_2x2_patches() -> None:
    x = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).view(2, 3, 4, 6)
    tokens = pack_pixels(x)
    assert tokens.shape == (2, 6, 12)
    # token 1 is the patch at row 0, cols 2-3: channel-major, then the 2x2 pixels row by row
    assert tokens[0, 1, :4].tolist() == [
        x[0, 0, 0, 2].item(),
        x[0, 0, 0, 3].item(),
        x[0, 0, 1, 2].item(),
        x[0, 0, 1, 3].item(),
    ]
    assert torch.equal(unpack_pixels(tokens, 4, 6), x)


def test_image_ids_are_row_col_per_token() -> None:
    ids = image_ids(4, 6)
    assert ids.shape == (6, 3)
    assert ids.tolist() == [[0, 0, 0], [0, 0, 1], [0, 0, 2], [0, 1, 0], [0, 1, 1], [0, 1, 2]]


def test_config_rope_axes_sum_to_head_dim() -> None:
    for head_dim in (16, 32, 40, 64, 128):
        axes = flux_config(head_dim=head_dim)["axes_dims_rope"]
        assert sum(axes) == head_dim and all(a % 2 == 0 and a > 0 for a in axes)
    cfg = PRESETS["flux"]
    assert cfg["in_channels"] == 12 and cfg["joint_attention_dim"] == TEXT_DIM == cfg["pooled_projection_dim"]
    with pytest.raises(ValueError, match="sum to head_dim"):
        flux_config(head_dim=32, rope_axes=(8, 8, 8))


def test_shipped_preset_has_both_block_kinds_and_a_few_million_params() -> None:
    model = build_denoiser("flux", PRESETS["flux"])
    assert type(model) is FluxTransformer2DModel and denoiser_kind(model) == "flux"
    assert sum(isinstance(m, FluxTransformerBlock) for m in model.modules()) == PRESETS["flux"]["num_layers"] >= 1
    singles = [m for m in model.modules() if isinstance(m, FluxSingleTransformerBlock)]
    assert len(singles) == PRESETS["flux"]["num_single_layers"] >= 1
    dim = PRESETS["flux"]["num_attention_heads"] * PRESETS["flux"]["attention_head_dim"]
    assert singles[0].proj_out.in_features == dim + singles[0].mlp_hidden_dim  # the ragged concatenation
    assert 1e6 < sum(p.numel() for p in model.parameters()) < 10e6


def test_velocity_depends_on_where_things_are(tiny_flux) -> None:
    """RoPE is the only position signal: moving content must change the prediction elsewhere."""
    model = tiny_flux.transformer
    states, pooled = encode_prompts([PROMPT])
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.5])
    with torch.no_grad():
        v = predict_velocity(model, x, t, states, pooled)
        v_rolled = predict_velocity(model, torch.roll(x, 8, dims=3), t, states, pooled)
        v_other_prompt = predict_velocity(model, x, t, *encode_prompts(["a small green circle"]))
    assert v.shape == x.shape and torch.isfinite(v).all()
    assert not torch.allclose(torch.roll(v, 8, dims=3), v_rolled, atol=1e-5)
    assert not torch.allclose(v, v_other_prompt, atol=1e-5)


def test_pipeline_class_save_load_round_trip(tiny_flux, tmp_path: Path) -> None:
    assert type(tiny_flux) is ShapesFluxPipeline and type(tiny_flux.transformer) is FluxTransformer2DModel
    tiny_flux.save_pretrained(tmp_path, safe_serialization=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_index.json", "scheduler", "transformer"]
    assert json.loads((tmp_path / "model_index.json").read_text())["_class_name"] == "ShapesFluxPipeline"
    gen = [torch.Generator().manual_seed(4)]
    ref = tiny_flux(PROMPT, generator=gen, num_inference_steps=3, output_type="np").images
    for loaded in (load_pipeline(tmp_path), DiffusionPipeline.from_pretrained(tmp_path, local_files_only=True)):
        assert type(loaded) is ShapesFluxPipeline
        loaded.set_progress_bar_config(disable=True)
        out = loaded(PROMPT, generator=[torch.Generator().manual_seed(4)], num_inference_steps=3, output_type="np")
        np.testing.assert_array_equal(out.images, ref)


def test_sizes_must_be_even(tiny_flux) -> None:
    with pytest.raises(ValueError, match="multiples of 2"):
        tiny_flux(PROMPT, height=31, num_inference_steps=1)
    assert tiny_flux(PROMPT, height=16, width=24, num_inference_steps=1).images[0].size == (24, 16)


def test_two_train_steps_then_init_from_the_exported_pipeline(tmp_path: Path) -> None:
    examples = generate_examples(4, seed=0)
    states, pooled = encode_prompts([e.caption for e in examples])
    images = np.stack([e.image for e in examples])
    torch.manual_seed(0)
    model = build_denoiser("flux", PRESETS["flux-tiny"]).train()
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = make_optimizer(model, 1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    gen = torch.Generator().manual_seed(0)
    losses = [train_step(model, opt, ema, images, states, pooled, s, TrainConfig(batch=4), gen) for s in range(2)]
    assert all(np.isfinite(losses))
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    from segquant_shapes.pipelines import make_pipeline

    make_pipeline(copy.deepcopy(ema).eval()).save_pretrained(tmp_path / "pipe", safe_serialization=True)
    fresh = build_denoiser("flux", PRESETS["flux-tiny"])
    fresh_ema = copy.deepcopy(fresh)
    assert init_from_pipeline(tmp_path / "pipe", "flux", fresh, fresh_ema) == (0, 0.0)
    for a, b in zip(ema.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)


def test_shipped_flux_is_a_known_name() -> None:
    assert shipped_pipeline_path("flux").name == "flux"
    with pytest.raises(ValueError, match="unknown shipped model"):
        shipped_pipeline_path("sdxl")


def test_service_sizes_for_the_flux_sources_default_to_32() -> None:
    from service.registry import derive_size_rule

    for source in ("tiny:flux", "shipped:flux"):
        rule = derive_size_rule(source)
        assert (rule.multiple_of, rule.default) == (2, 32), source


def test_cli_loads_shipped_flux_by_name_or_says_why_not() -> None:
    from segquant_cli.errors import CLIError
    from segquant_cli.models import load_pipeline as cli_load

    if not (shipped_pipeline_path("flux") / "model_index.json").exists():
        with pytest.raises(CLIError, match="shipped:flux"):
            cli_load("shipped:flux")
        return
    pipe = cli_load("shipped:flux")
    assert type(pipe) is ShapesFluxPipeline and type(pipe.transformer) is FluxTransformer2DModel


def test_a_flux_run_exports_to_a_loadable_pipeline_with_a_card(tmp_path: Path) -> None:
    from segquant_shapes.checkpoint import save_checkpoint
    from segquant_shapes.export import export_run

    run = tmp_path / "run"
    run.mkdir()
    cfg = dict(PRESETS["flux-tiny"])
    (run / "run_config.json").write_text(
        json.dumps({"kind": "flux", "train": TrainConfig(model="flux").__dict__, "model_config": cfg, "command": "x"})
    )
    torch.manual_seed(1)
    model = build_denoiser("flux", cfg)
    save_checkpoint(run, 7, model, model, make_optimizer(model, 1e-3), {"loss": 0.5, "train_seconds": 3.0})
    facts = export_run(run, tmp_path / "out", evaluate=False)
    assert facts["kind"] == "flux" and facts["step"] == 7
    card = (tmp_path / "out" / "MODEL_CARD.md").read_text()
    assert "FluxTransformer2DModel" in card and "**7**" in card
    pipe = load_pipeline(tmp_path / "out")
    assert type(pipe) is ShapesFluxPipeline
    for a, b in zip(model.state_dict().values(), pipe.transformer.state_dict().values()):
        assert torch.equal(a, b)
