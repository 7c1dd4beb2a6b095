"""Golden plans for the shipped models (``shipped:mmdit``, ``shipped:unet``, ``shipped:flux``): the exact plan,
plus the patterns SegQuant is about, asserted on their own so that a regenerated golden file cannot silently lose
one.

The golden files are what ``segquant plan`` prints. After a deliberate change to detection or to a shipped
model's architecture, regenerate them with::

    segquant plan shipped:mmdit --json > tests/detect/golden/shipped_mmdit.json
    segquant plan shipped:unet --json > tests/detect/golden/shipped_unet.json
    segquant plan shipped:flux --json > tests/detect/golden/shipped_flux.json

and review the diff. Plans depend on the architecture (config), not on the weights: re-exporting a model from a
later training step does not change them.
"""

from __future__ import annotations

import fnmatch
import json
import re
from pathlib import Path

import pytest
from torch import nn

from segquant_core.detect import Plan, detect, example_inputs_for

GOLDEN = Path(__file__).with_name("golden")
REGENERATE = "segquant plan shipped:{name} --json > tests/detect/golden/shipped_{name}.json"


def _denoiser(name: str) -> nn.Module:
    shapes = pytest.importorskip("segquant_shapes")
    if not (shapes.shipped_pipeline_path(name) / "model_index.json").exists():
        pytest.fail(f"shipped:{name} has no weights in this checkout")  # they are part of the repository
    pipe = shapes.load_shipped(name)
    return pipe.unet if name == "unet" else pipe.transformer


@pytest.fixture(scope="module")
def mmdit() -> tuple[nn.Module, Plan]:
    model = _denoiser("mmdit")
    return model, detect(model, example_inputs_for(model))  # what `segquant plan` runs


@pytest.fixture(scope="module")
def unet() -> tuple[nn.Module, Plan]:
    model = _denoiser("unet")
    return model, detect(model, example_inputs_for(model))


@pytest.fixture(scope="module")
def flux() -> tuple[nn.Module, Plan]:
    model = _denoiser("flux")
    return model, detect(model, example_inputs_for(model))


def _seg(plan: Plan, layer: str) -> tuple[str, list[int]] | None:
    seg = plan[layer].segments
    return (seg.axis, list(seg.sizes)) if seg else None


@pytest.mark.parametrize("name", ["mmdit", "unet", "flux"])
def test_shipped_plan_equals_golden(name: str, request: pytest.FixtureRequest) -> None:
    model, plan = request.getfixturevalue(name)
    golden = json.loads((GOLDEN / f"shipped_{name}.json").read_text())
    assert plan.layers == [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert plan.to_list() == golden, f"plan changed; if on purpose, regenerate: {REGENERATE.format(name=name)}"


def test_shipped_mmdit_patterns(mmdit: tuple[nn.Module, Plan]) -> None:
    """SD3-style MMDiT, 4 blocks of 4 heads × 40 (dim 160); block 3 is the last, context_pre_only block."""
    model, plan = mmdit
    blocks = len(model.transformer_blocks)
    assert blocks == 4 and model.config.num_attention_heads == 4 and model.config.attention_head_dim == 40
    for i in range(blocks):
        last = i == blocks - 1
        b = f"transformer_blocks.{i}"
        assert _seg(plan, f"{b}.norm1.linear") == ("out", [160] * 6)  # AdaLN-Zero: 6 chunks
        assert _seg(plan, f"{b}.norm1_context.linear") == ("out", [160] * (2 if last else 6))
        assert _seg(plan, f"{b}.attn.to_out.0") == ("in", [40] * 4)  # per-head output projection
        if not last:
            assert _seg(plan, f"{b}.attn.to_add_out") == ("in", [40] * 4)
        for proj in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"):
            assert plan[f"{b}.attn.{proj}"].segments is None and not plan[f"{b}.attn.{proj}"].dual_scale
    assert _seg(plan, "norm_out.linear") == ("out", [160, 160])
    assert _seg(plan, "time_text_embed.timestep_embedder.linear_1") == ("in", [128, 128])  # sin | cos
    # DualScale exactly where the input comes from SiLU/GELU: AdaLN modulations, FF down-projections, embedders
    dual = {r.layer for r in plan if r.dual_scale}
    expect = [
        "transformer_blocks.*.norm1*.linear",
        "transformer_blocks.*.ff*.net.2",
        "norm_out.linear",
        "time_text_embed.*.linear_2",
    ]
    assert dual == {r.layer for r in plan if any(fnmatch.fnmatchcase(r.layer, p) for p in expect)}
    assert len(dual) == 4 * 2 + 4 + 3 + 1 + 2  # norm1*, ff, ff_context (not in the last block), norm_out, embedders
    assert not any(isinstance(r.dual_scale, tuple) for r in plan)  # no mixed cat feeds a linear here


def test_shipped_unet_patterns(unet: tuple[nn.Module, Plan]) -> None:
    """SD-style UNet (64/128 channels, one cross-attention level + mid block), GEGLU feed-forwards, 4 heads × 32."""
    _, plan = unet
    tblocks = sorted({m.group(1) for r in plan if (m := re.match(r"(.*transformer_blocks\.\d+)\.", r.layer))})
    assert len(tblocks) == 4  # down_blocks.1, up_blocks.0 (×2), mid_block
    for b in tblocks:
        assert _seg(plan, f"{b}.ff.net.0.proj") == ("out", [512, 512])  # GEGLU: value half | gate half
        assert not plan[f"{b}.ff.net.0.proj"].dual_scale
        assert plan[f"{b}.ff.net.2"].dual_scale and plan[f"{b}.ff.net.2"].segments is None  # hidden * gelu(gate)
        for attn in ("attn1", "attn2"):
            assert _seg(plan, f"{b}.{attn}.to_out.0") == ("in", [32] * 4)  # per-head output projection
    assert _seg(plan, "time_embedding.linear_1") == ("in", [32, 32])  # sin | cos of the timestep
    dual = {r.layer for r in plan if r.dual_scale}
    assert not any(isinstance(r.dual_scale, tuple) for r in plan)  # no mixed cat feeds a linear here
    expect = ["*.ff.net.2", "*.resnets.*.time_emb_proj", "time_embedding.linear_2"]
    assert dual == {r.layer for r in plan if any(fnmatch.fnmatchcase(r.layer, p) for p in expect)}
    segmented = {r.layer for r in plan if r.segments}
    assert segmented == {f"{b}.{s}" for b in tblocks for s in ("ff.net.0.proj", "attn1.to_out.0", "attn2.to_out.0")} | {
        "time_embedding.linear_1"
    }


def test_shipped_flux_patterns(flux: tuple[nn.Module, Plan]) -> None:
    """Flux-style model, 2 double-stream + 2 single-stream blocks of 4 heads × 40 (dim 160, MLP 640)."""
    model, plan = flux
    double, single = len(model.transformer_blocks), len(model.single_transformer_blocks)
    assert (double, single) == (2, 2) and model.config.num_attention_heads == 4
    assert model.config.attention_head_dim == 40
    for i in range(double):
        b = f"transformer_blocks.{i}"
        assert _seg(plan, f"{b}.norm1.linear") == ("out", [160] * 6)  # AdaLN-Zero of the image stream
        assert _seg(plan, f"{b}.norm1_context.linear") == ("out", [160] * 6)  # ... and of the text stream
        assert plan[f"{b}.norm1.linear"].dual_scale is True and plan[f"{b}.norm1_context.linear"].dual_scale is True
        for out in ("attn.to_out.0", "attn.to_add_out"):
            assert _seg(plan, f"{b}.{out}") == ("in", [40] * 4)  # per-head output projections
            assert plan[f"{b}.{out}"].dual_scale is False
    for i in range(single):
        b = f"single_transformer_blocks.{i}"
        assert _seg(plan, f"{b}.norm.linear") == ("out", [160] * 3)  # single-stream AdaLN: shift, scale, gate
        assert plan[f"{b}.norm.linear"].dual_scale is True
        # ragged cat(attention 160, GELU-MLP 640): DualScale on the MLP segment only
        assert _seg(plan, f"{b}.proj_out") == ("in", [160, 640])
        assert plan[f"{b}.proj_out"].dual_scale == (False, True)
    assert _seg(plan, "norm_out.linear") == ("out", [160, 160])
    assert _seg(plan, "time_text_embed.timestep_embedder.linear_1") == ("in", [128, 128])  # sin | cos
    per_segment = {r.layer for r in plan if isinstance(r.dual_scale, tuple)}
    assert per_segment == {f"single_transformer_blocks.{i}.proj_out" for i in range(single)}
    dual = {r.layer for r in plan if r.dual_scale is True}
    expect = [
        "*.norm1*.linear",
        "single_transformer_blocks.*.norm.linear",
        "*.ff*.net.2",
        "norm_out.linear",
        "time_text_embed.*.linear_2",
    ]
    assert dual == {r.layer for r in plan if any(fnmatch.fnmatchcase(r.layer, p) for p in expect)}
