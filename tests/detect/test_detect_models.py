"""Golden plans on tiny stock diffusers denoisers (SEGQUANT.md §11.2 item 20, checked against §3.3).

SD3(.5) and Flux are asserted record by record (the whole plan, JSON-comparable); PixArt and the SDXL-like UNet
are asserted pattern → expected record, with every linear covered by exactly one pattern. Beyond the reference's
§3.3 lists these also expect what it misses: the timestep/guidance embedders' ``linear_1`` input is the sin|cos
``cat`` of the raw timestep, Flux's single-block ``proj_out`` input is a ragged ``cat`` (attention | MLP), SDXL's
``add_embedding.linear_1`` input is the ragged ``concat`` (text_embeds | time ids), and PixArt's
``adaln_single.linear`` output is split 6 ways through ``reshape(B, 6, -1) + scale_shift_table``.
"""

from __future__ import annotations

import fnmatch
import logging
from typing import Any

import pytest
from detect_tiny_models import tiny_flux, tiny_pixart, tiny_sd3, tiny_sdxl_unet
from torch import nn

from segquant_core.detect import Plan, detect

Rec = tuple[str, tuple[str, list[int]] | None, bool | list[bool]]  # dual: one flag, or one per in-segment


def as_list(expected: list[Rec]) -> list[dict[str, Any]]:
    return [
        {"layer": name, "segments": {"axis": seg[0], "sizes": seg[1]} if seg else None, "dual_scale": dual}
        for name, seg, dual in expected
    ]


def linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def check_patterns(plan: Plan, expected: dict[str, tuple[tuple[str, list[int]] | None, bool]]) -> None:
    """Every record matches exactly one pattern and equals its expectation; every pattern is used."""
    used: set[str] = set()
    for rec in plan:
        hits = [p for p in expected if fnmatch.fnmatchcase(rec.layer, p)]
        assert len(hits) == 1, f"{rec.layer} matched {hits}"
        seg, dual = expected[hits[0]]
        got = (rec.segments.axis, list(rec.segments.sizes)) if rec.segments else None
        assert (got, rec.dual_scale) == (seg, dual), f"{rec.layer}: {rec.to_dict(True)}"
        used.add(hits[0])
    assert used == set(expected), f"unused patterns: {set(expected) - used}"


OUT6_16 = ("out", [16] * 6)
HEADS_2x8 = ("in", [8, 8])
SINCOS_256 = ("in", [128, 128])

# --------------------------------------------------------------------------------------------------------------
# SD3 / SD3.5: block 0 = dual-attention block (9-way AdaLN-Zero-X, attn2), block 1 = last, context_pre_only block.
# --------------------------------------------------------------------------------------------------------------
SD3_GOLDEN: list[Rec] = [
    ("time_text_embed.timestep_embedder.linear_1", SINCOS_256, False),  # beyond §3.3: sin|cos cat of raw input
    ("time_text_embed.timestep_embedder.linear_2", None, True),
    ("time_text_embed.text_embedder.linear_1", None, False),
    ("time_text_embed.text_embedder.linear_2", None, True),
    ("context_embedder", None, False),
    ("transformer_blocks.0.norm1.linear", ("out", [16] * 9), True),  # SD35AdaLayerNormZeroX: 9 chunks
    ("transformer_blocks.0.norm1_context.linear", OUT6_16, True),
    ("transformer_blocks.0.attn.to_q", None, False),
    ("transformer_blocks.0.attn.to_k", None, False),
    ("transformer_blocks.0.attn.to_v", None, False),
    ("transformer_blocks.0.attn.add_k_proj", None, False),
    ("transformer_blocks.0.attn.add_v_proj", None, False),
    ("transformer_blocks.0.attn.add_q_proj", None, False),
    ("transformer_blocks.0.attn.to_out.0", HEADS_2x8, False),
    ("transformer_blocks.0.attn.to_add_out", HEADS_2x8, False),
    ("transformer_blocks.0.attn2.to_q", None, False),
    ("transformer_blocks.0.attn2.to_k", None, False),
    ("transformer_blocks.0.attn2.to_v", None, False),
    ("transformer_blocks.0.attn2.to_out.0", HEADS_2x8, False),
    ("transformer_blocks.0.ff.net.0.proj", None, False),
    ("transformer_blocks.0.ff.net.2", None, True),
    ("transformer_blocks.0.ff_context.net.0.proj", None, False),
    ("transformer_blocks.0.ff_context.net.2", None, True),
    ("transformer_blocks.1.norm1.linear", OUT6_16, True),
    ("transformer_blocks.1.norm1_context.linear", ("out", [16, 16]), True),  # context_pre_only: 2 chunks
    ("transformer_blocks.1.attn.to_q", None, False),
    ("transformer_blocks.1.attn.to_k", None, False),
    ("transformer_blocks.1.attn.to_v", None, False),
    ("transformer_blocks.1.attn.add_k_proj", None, False),
    ("transformer_blocks.1.attn.add_v_proj", None, False),
    ("transformer_blocks.1.attn.add_q_proj", None, False),
    ("transformer_blocks.1.attn.to_out.0", HEADS_2x8, False),
    ("transformer_blocks.1.ff.net.0.proj", None, False),
    ("transformer_blocks.1.ff.net.2", None, True),
    ("norm_out.linear", ("out", [16, 16]), True),
    ("proj_out", None, False),
]

# --------------------------------------------------------------------------------------------------------------
# Flux: one double block, one single block, guidance embedder; inner dim 32 = 2 heads × 16, MLP 4× = 128.
# --------------------------------------------------------------------------------------------------------------
OUT6_32 = ("out", [32] * 6)
HEADS_2x16 = ("in", [16, 16])
FLUX_GOLDEN: list[Rec] = [
    ("time_text_embed.timestep_embedder.linear_1", SINCOS_256, False),  # beyond §3.3
    ("time_text_embed.timestep_embedder.linear_2", None, True),
    ("time_text_embed.guidance_embedder.linear_1", SINCOS_256, False),  # beyond §3.3
    ("time_text_embed.guidance_embedder.linear_2", None, True),
    ("time_text_embed.text_embedder.linear_1", None, False),
    ("time_text_embed.text_embedder.linear_2", None, True),
    ("context_embedder", None, False),
    ("x_embedder", None, False),
    ("transformer_blocks.0.norm1.linear", OUT6_32, True),
    ("transformer_blocks.0.norm1_context.linear", OUT6_32, True),
    ("transformer_blocks.0.attn.to_q", None, False),
    ("transformer_blocks.0.attn.to_k", None, False),
    ("transformer_blocks.0.attn.to_v", None, False),
    ("transformer_blocks.0.attn.to_out.0", HEADS_2x16, False),
    ("transformer_blocks.0.attn.add_q_proj", None, False),
    ("transformer_blocks.0.attn.add_k_proj", None, False),
    ("transformer_blocks.0.attn.add_v_proj", None, False),
    ("transformer_blocks.0.attn.to_add_out", HEADS_2x16, False),
    ("transformer_blocks.0.ff.net.0.proj", None, False),
    ("transformer_blocks.0.ff.net.2", None, True),
    ("transformer_blocks.0.ff_context.net.0.proj", None, False),
    ("transformer_blocks.0.ff_context.net.2", None, True),
    ("single_transformer_blocks.0.norm.linear", ("out", [32, 32, 32]), True),
    ("single_transformer_blocks.0.proj_mlp", None, False),
    # beyond §3.3: ragged attn | GELU-MLP, DualScale on the MLP segment only
    ("single_transformer_blocks.0.proj_out", ("in", [32, 128]), [False, True]),
    ("single_transformer_blocks.0.attn.to_q", None, False),
    ("single_transformer_blocks.0.attn.to_k", None, False),
    ("single_transformer_blocks.0.attn.to_v", None, False),
    ("norm_out.linear", ("out", [32, 32]), True),
    ("proj_out", None, False),
]

# --------------------------------------------------------------------------------------------------------------
# PixArt-α: two ada_norm_single blocks, inner dim 16 = 2 heads × 8, GELU(tanh) feed-forward and caption projection.
# --------------------------------------------------------------------------------------------------------------
PIXART_EXPECTED = {
    "adaln_single.emb.timestep_embedder.linear_1": (SINCOS_256, False),
    "adaln_single.emb.timestep_embedder.linear_2": (None, True),
    "adaln_single.linear": (OUT6_16, True),  # reshape(B, 6, -1) + table → chunk(6, dim=1)
    "caption_projection.linear_1": (None, False),
    "caption_projection.linear_2": (None, True),  # GELU(tanh)
    "transformer_blocks.*.attn[12].to_[qkv]": (None, False),
    "transformer_blocks.*.attn[12].to_out.0": (HEADS_2x8, False),
    "transformer_blocks.*.ff.net.0.proj": (None, False),
    "transformer_blocks.*.ff.net.2": (None, True),
    "proj_out": (None, False),
}

# --------------------------------------------------------------------------------------------------------------
# SDXL-like UNet: GEGLU FFs (inner 4·32 = 128 per half), 4 heads × 8, text_time added conditions (32 | 6·8).
# --------------------------------------------------------------------------------------------------------------
UNET_EXPECTED = {
    "time_embedding.linear_1": (("in", [8, 8]), False),  # sin|cos of the raw timestep, 16 channels
    "time_embedding.linear_2": (None, True),
    "add_embedding.linear_1": (("in", [32, 48]), False),  # concat(text_embeds, time-id embeddings): ragged
    "add_embedding.linear_2": (None, True),
    "*.resnets.*.time_emb_proj": (None, True),  # SiLU(temb)
    "*.attentions.*.proj_in": (None, False),
    "*.attentions.*.proj_out": (None, False),
    "*.transformer_blocks.*.attn[12].to_[qkv]": (None, False),
    "*.transformer_blocks.*.attn[12].to_out.0": (("in", [8, 8, 8, 8]), False),
    "*.transformer_blocks.*.ff.net.0.proj": (("out", [128, 128]), False),  # GEGLU value | gate
    "*.transformer_blocks.*.ff.net.2": (None, True),  # hidden * gelu(gate)
}


@pytest.fixture(scope="module")
def sd3() -> nn.Module:
    return tiny_sd3()


@pytest.fixture(scope="module")
def flux() -> nn.Module:
    return tiny_flux()


@pytest.fixture(scope="module")
def pixart() -> nn.Module:
    return tiny_pixart()


@pytest.fixture(scope="module")
def unet() -> nn.Module:
    return tiny_sdxl_unet()


@pytest.fixture(scope="module")
def sd3_plan(sd3: nn.Module) -> Plan:
    return detect(sd3)


@pytest.fixture(scope="module")
def flux_plan(flux: nn.Module) -> Plan:
    return detect(flux)


@pytest.fixture(scope="module")
def pixart_plan(pixart: nn.Module) -> Plan:
    return detect(pixart)


@pytest.fixture(scope="module")
def unet_plan(unet: nn.Module) -> Plan:
    return detect(unet)


def test_sd3_full_plan(sd3: nn.Module, sd3_plan: Plan) -> None:  # §11.2 item 20
    assert sd3_plan.layers == linear_names(sd3)
    assert sd3_plan.to_list() == as_list(SD3_GOLDEN)


def test_sd3_reasons(sd3_plan: Plan) -> None:
    assert sd3_plan["transformer_blocks.0.norm1.linear"].reasons == (
        "output chunked into 9 along the last dim (dim=1, aten.chunk)",
        "input from SiLU (aten.silu)",
    )
    assert sd3_plan["transformer_blocks.0.attn.to_out.0"].reasons[0].startswith("input is a per-head reshape 2×8")
    assert sd3_plan["transformer_blocks.0.ff.net.2"].reasons == ("input from GELU(tanh) (aten.gelu) via dropout",)
    assert "cat of 2 parts [128, 128]" in sd3_plan["time_text_embed.timestep_embedder.linear_1"].reasons[0]


def test_flux_full_plan(flux: nn.Module, flux_plan: Plan) -> None:  # §11.2 item 20
    assert flux_plan.layers == linear_names(flux)
    assert flux_plan.to_list() == as_list(FLUX_GOLDEN)


def test_flux_single_block_proj_out_reasons(flux_plan: Plan) -> None:
    reasons = flux_plan["single_transformer_blocks.0.proj_out"].reasons
    assert "cat of 2 parts [32, 128]" in reasons[0]
    assert "part 0 is itself a per-head reshape 2×16" in reasons[0]
    # attn | GELU-MLP: each part walked back on its own, DualScale on the MLP part only, and it says why
    assert flux_plan["single_transformer_blocks.0.proj_out"].dual_scale == (False, True)
    assert any("DualScale on in-segment(s) [1] only" in r and "GELU(tanh)" in r for r in reasons)
    assert not any("mixed input" in r for r in reasons)


def test_pixart_plan(pixart: nn.Module, pixart_plan: Plan) -> None:  # §11.2 item 20
    plan = pixart_plan
    assert plan.layers == linear_names(pixart)
    check_patterns(plan, PIXART_EXPECTED)
    assert "(6, 16) view" in plan["adaln_single.linear"].reasons[0]


def test_sdxl_unet_plan(unet: nn.Module, unet_plan: Plan) -> None:  # §11.2 item 20
    plan = unet_plan
    assert plan.layers == linear_names(unet)
    check_patterns(plan, UNET_EXPECTED)
    assert "aten.concat" in plan["add_embedding.linear_1"].reasons[0]
    assert "gated product" in plan["mid_block.attentions.0.transformer_blocks.1.ff.net.2"].reasons[0]


@pytest.mark.parametrize("name", ["sd3", "flux", "pixart", "unet"])
def test_dispatch_capture_agrees_with_export(
    name: str, request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture
) -> None:
    """The fixtures' plans come from torch.export; the dispatch-level recorder must find the same plan."""
    model, exported = request.getfixturevalue(name), request.getfixturevalue(f"{name}_plan")
    with caplog.at_level(logging.INFO, logger="segquant_core.detect"):
        dispatched = detect(model, capture_method="dispatch")
    assert "with dispatch-level recording" in caplog.text
    assert dispatched == exported
