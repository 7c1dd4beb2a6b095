"""Golden plans on the FULL-size configs of SD3.5-medium, SD3.5-large, Flux.1-dev, SDXL's UNet and PixArt-Σ.

The models are built on the meta device (:mod:`segquant_core.bench.real_configs`), so no weights or memory are
needed, and the whole depth is detected (one forward on meta tensors, 1-2 s each with the dispatch recorder).
Per model the test asserts the counts of linears, out-segmented, in-segmented (ragged ones named) and DualScale
layers, the plan of every top-level linear, and the plan of one block of each kind, which every block of that
kind must equal.
Export-based capture (the default) is checked to give the same plan on meta for SD3.5-medium; it is 5-15 s per
model, so the other four are detected with the dispatch recorder only (the two methods are compared on all four
families at tiny size in ``test_detect_models.py``).
"""

from __future__ import annotations

import fnmatch
import functools
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from segquant_core.bench.real_configs import build_on_meta
from segquant_core.detect import Plan, detect

Seg = tuple[str, list[int]] | None
Rec = tuple[str, Seg, bool | tuple[bool, ...]]  # DualScale: one flag, or one per in-segment


def heads(n: int, d: int) -> Seg:
    """Per-head in-segments (``to_out``: ``(…, n, d) → (…, n·d)``)."""
    return ("in", [d] * n)


def chunks(n: int, d: int) -> Seg:
    """AdaLN out-segments: the modulation output chunked ``n`` ways."""
    return ("out", [d] * n)


SINCOS_256 = ("in", [128, 128])  # timestep (and guidance) sin|cos cat of the raw input


# ------------------------------------------------------------------------------------------------------------
# expected plans of one block of each kind, relative to the block
# ------------------------------------------------------------------------------------------------------------
def sd3_block(dim: int, n_heads: int, adaln: int, context: str) -> list[Rec]:
    """An SD3/SD3.5 ``JointTransformerBlock``: ``adaln`` = 9 (dual attention, AdaLayerNormZeroX) or 6;
    ``context`` = "full" or "pre_only" (the last block: context AdaLN has 2 chunks, no to_add_out, no ff_context)."""
    recs: list[Rec] = [
        ("norm1.linear", chunks(adaln, dim), True),
        ("norm1_context.linear", chunks(6 if context == "full" else 2, dim), True),
        ("attn.to_q", None, False),
        ("attn.to_k", None, False),
        ("attn.to_v", None, False),
        ("attn.add_k_proj", None, False),
        ("attn.add_v_proj", None, False),
        ("attn.add_q_proj", None, False),
        ("attn.to_out.0", heads(n_heads, 64), False),
    ]
    if context == "full":
        recs.append(("attn.to_add_out", heads(n_heads, 64), False))
    if adaln == 9:
        recs += [
            ("attn2.to_q", None, False),
            ("attn2.to_k", None, False),
            ("attn2.to_v", None, False),
            ("attn2.to_out.0", heads(n_heads, 64), False),
        ]
    recs += [("ff.net.0.proj", None, False), ("ff.net.2", None, True)]
    if context == "full":
        recs += [("ff_context.net.0.proj", None, False), ("ff_context.net.2", None, True)]
    return recs


def sd3_top(dim: int) -> list[Rec]:
    return [
        ("time_text_embed.timestep_embedder.linear_1", SINCOS_256, False),
        ("time_text_embed.timestep_embedder.linear_2", None, True),
        ("time_text_embed.text_embedder.linear_1", None, False),
        ("time_text_embed.text_embedder.linear_2", None, True),
        ("context_embedder", None, False),
        ("norm_out.linear", chunks(2, dim), True),
        ("proj_out", None, False),
    ]


FLUX_DOUBLE: list[Rec] = [
    ("norm1.linear", chunks(6, 3072), True),
    ("norm1_context.linear", chunks(6, 3072), True),
    ("attn.to_q", None, False),
    ("attn.to_k", None, False),
    ("attn.to_v", None, False),
    ("attn.to_out.0", heads(24, 128), False),
    ("attn.add_q_proj", None, False),
    ("attn.add_k_proj", None, False),
    ("attn.add_v_proj", None, False),
    ("attn.to_add_out", heads(24, 128), False),
    ("ff.net.0.proj", None, False),
    ("ff.net.2", None, True),
    ("ff_context.net.0.proj", None, False),
    ("ff_context.net.2", None, True),
]
FLUX_SINGLE: list[Rec] = [
    ("norm.linear", chunks(3, 3072), True),
    ("proj_mlp", None, False),
    ("proj_out", ("in", [3072, 12288]), (False, True)),  # ragged: attention | GELU-MLP, DualScale on the MLP only
    ("attn.to_q", None, False),
    ("attn.to_k", None, False),
    ("attn.to_v", None, False),
]
FLUX_TOP: list[Rec] = [
    ("time_text_embed.timestep_embedder.linear_1", SINCOS_256, False),
    ("time_text_embed.timestep_embedder.linear_2", None, True),
    ("time_text_embed.guidance_embedder.linear_1", SINCOS_256, False),
    ("time_text_embed.guidance_embedder.linear_2", None, True),
    ("time_text_embed.text_embedder.linear_1", None, False),
    ("time_text_embed.text_embedder.linear_2", None, True),
    ("context_embedder", None, False),
    ("x_embedder", None, False),
    ("norm_out.linear", chunks(2, 3072), True),
    ("proj_out", None, False),
]


def unet_block(n_heads: int, dim: int) -> list[Rec]:
    """An SDXL ``BasicTransformerBlock``: self- and cross-attention, GEGLU feed-forward (4·dim per half)."""
    return [
        ("attn1.to_q", None, False),
        ("attn1.to_k", None, False),
        ("attn1.to_v", None, False),
        ("attn1.to_out.0", heads(n_heads, 64), False),
        ("attn2.to_q", None, False),
        ("attn2.to_k", None, False),
        ("attn2.to_v", None, False),
        ("attn2.to_out.0", heads(n_heads, 64), False),
        ("ff.net.0.proj", ("out", [4 * dim, 4 * dim]), False),  # GEGLU value | gate
        ("ff.net.2", None, True),  # hidden * gelu(gate)
    ]


#: UNet layers outside transformer blocks, by pattern (every pattern used, every layer matched once)
UNET_TOP_PATTERNS: dict[str, tuple[Seg, bool]] = {
    "time_embedding.linear_1": (("in", [160, 160]), False),  # sin|cos of the raw timestep, 320 channels
    "time_embedding.linear_2": (None, True),
    "add_embedding.linear_1": (("in", [1280, 1536]), False),  # concat(text_embeds 1280, 6 time ids × 256): ragged
    "add_embedding.linear_2": (None, True),
    "*.resnets.*.time_emb_proj": (None, True),  # SiLU(temb)
    "*.attentions.*.proj_in": (None, False),
    "*.attentions.*.proj_out": (None, False),
}

PIXART_BLOCK: list[Rec] = [
    ("attn1.to_q", None, False),
    ("attn1.to_k", None, False),
    ("attn1.to_v", None, False),
    ("attn1.to_out.0", heads(16, 72), False),
    ("attn2.to_q", None, False),
    ("attn2.to_k", None, False),
    ("attn2.to_v", None, False),
    ("attn2.to_out.0", heads(16, 72), False),
    ("ff.net.0.proj", None, False),
    ("ff.net.2", None, True),  # GELU(tanh)
]
PIXART_TOP: list[Rec] = [
    ("proj_out", None, False),
    ("adaln_single.emb.timestep_embedder.linear_1", SINCOS_256, False),
    ("adaln_single.emb.timestep_embedder.linear_2", None, True),
    ("adaln_single.linear", chunks(6, 1152), True),  # reshape(B, 6, -1) + scale_shift_table → chunk(6, dim=1)
    ("caption_projection.linear_1", None, False),
    ("caption_projection.linear_2", None, True),
]


@dataclass(frozen=True)
class Expected:
    """What the plan of one full-size model must be."""

    params_billions: float  # parameter count, rounded to 0.01 B (checks the config against REAL_SIZE.md)
    linears: int
    out_segmented: int
    in_segmented: int
    dual_scale: int  # layers whose whole input gets DualScale
    ragged: dict[str, Seg]  # layer pattern -> segments, for every layer with unequal segment sizes
    block_kinds: dict[str, tuple[list[str], list[Rec]]]  # kind -> (block prefixes, plan relative to the block)
    top: list[Rec] | dict[str, tuple[Seg, bool]]  # layers outside blocks: exact list, or patterns
    dual_on_some_segments: int = 0  # layers with DualScale on some in-segments only (Flux single-stream proj_out)


def _blocks(prefix: str, indices: range) -> list[str]:
    return [f"{prefix}.{i}" for i in indices]


def _unet_blocks(where: list[tuple[str, int, int]]) -> list[str]:
    """``(parent, n_attentions, layers_per_attention)`` → every transformer block prefix under them."""
    return [
        f"{parent}.attentions.{a}.transformer_blocks.{t}"
        for parent, n_att, n_tb in where
        for a in range(n_att)
        for t in range(n_tb)
    ]


EXPECTED: dict[str, Expected] = {
    # 13 dual-attention blocks × 18 + 10 × 14 + last block 11 + 7 top-level = 392
    "sd3.5-medium": Expected(
        2.24,
        392,
        out_segmented=49,
        in_segmented=61,
        dual_scale=98,
        ragged={},
        block_kinds={
            "dual-attention": (_blocks("transformer_blocks", range(13)), sd3_block(1536, 24, 9, "full")),
            "joint": (_blocks("transformer_blocks", range(13, 23)), sd3_block(1536, 24, 6, "full")),
            "last (context_pre_only)": (["transformer_blocks.23"], sd3_block(1536, 24, 6, "pre_only")),
        },
        top=sd3_top(1536),
    ),
    # 37 × 14 + 11 + 7 = 536
    "sd3.5-large": Expected(
        8.06,
        536,
        out_segmented=77,
        in_segmented=76,
        dual_scale=154,
        ragged={},
        block_kinds={
            "joint": (_blocks("transformer_blocks", range(37)), sd3_block(2432, 38, 6, "full")),
            "last (context_pre_only)": (["transformer_blocks.37"], sd3_block(2432, 38, 6, "pre_only")),
        },
        top=sd3_top(2432),
    ),
    # 19 × 14 + 38 × 6 + 10 = 504
    "flux.1-dev": Expected(
        11.90,
        504,
        out_segmented=77,
        in_segmented=78,
        dual_scale=118,
        ragged={"single_transformer_blocks.*.proj_out": ("in", [3072, 12288])},
        block_kinds={
            "double-stream": (_blocks("transformer_blocks", range(19)), FLUX_DOUBLE),
            "single-stream": (_blocks("single_transformer_blocks", range(38)), FLUX_SINGLE),
        },
        top=FLUX_TOP,
        dual_on_some_segments=38,  # every single-stream proj_out
    ),
    # 70 transformer blocks × 10 + 11 attentions × (proj_in, proj_out) + 17 resnets + 4 embedders = 743
    "sdxl-unet": Expected(
        2.57,
        743,
        out_segmented=70,
        in_segmented=142,
        dual_scale=89,
        ragged={"add_embedding.linear_1": ("in", [1280, 1536])},
        block_kinds={
            "640 wide (10 heads)": (
                _unet_blocks([("down_blocks.1", 2, 2), ("up_blocks.1", 3, 2)]),
                unet_block(10, 640),
            ),
            "1280 wide (20 heads)": (
                _unet_blocks([("down_blocks.2", 2, 10), ("mid_block", 1, 10), ("up_blocks.0", 3, 10)]),
                unet_block(20, 1280),
            ),
        },
        top=UNET_TOP_PATTERNS,
    ),
    # 28 × 10 + 6 = 286
    "pixart-sigma-1024": Expected(
        0.61,
        286,
        out_segmented=1,
        in_segmented=57,
        dual_scale=31,
        ragged={},
        block_kinds={"ada_norm_single": (_blocks("transformer_blocks", range(28)), PIXART_BLOCK)},
        top=PIXART_TOP,
    ),
}

_BLOCK = re.compile(r"^(.*transformer_blocks\.\d+)\.(.+)$")


def _rec(layer: str, plan: Plan) -> tuple[Seg, bool]:
    r = plan[layer]
    return ((r.segments.axis, list(r.segments.sizes)) if r.segments else None), r.dual_scale


def split_by_block(plan: Plan) -> tuple[dict[str, list[Rec]], list[Rec]]:
    """``{block prefix: [(relative layer, seg, dual), …]}`` and the records outside any transformer block."""
    blocks: dict[str, list[Rec]] = {}
    top: list[Rec] = []
    for r in plan:
        m = _BLOCK.match(r.layer)
        seg, dual = _rec(r.layer, plan)
        if m:
            blocks.setdefault(m.group(1), []).append((m.group(2), seg, dual))
        else:
            top.append((r.layer, seg, dual))
    return blocks, top


@functools.cache
def meta_plan(name: str) -> Plan:
    """Detect the full-size model on meta (dispatch recorder), once per test process."""
    model = build_on_meta(name)
    plan = detect(model, capture_method="dispatch")
    assert all(t.is_meta for t in [*model.parameters(), *model.buffers()]), "detection materialised a tensor"
    return plan


@pytest.mark.parametrize("name", list(EXPECTED))
def test_real_size_counts(name: str) -> None:
    exp, plan = EXPECTED[name], meta_plan(name)
    model = build_on_meta(name)
    assert round(sum(p.numel() for p in model.parameters()) / 1e9, 2) == exp.params_billions
    assert plan.layers == [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    counts = (
        len(plan),
        sum(1 for r in plan if r.segments and r.segments.axis == "out"),
        sum(1 for r in plan if r.segments and r.segments.axis == "in"),
        sum(1 for r in plan if r.dual_scale is True),
        sum(1 for r in plan if isinstance(r.dual_scale, tuple)),
    )
    expected = (exp.linears, exp.out_segmented, exp.in_segmented, exp.dual_scale, exp.dual_on_some_segments)
    assert counts == expected
    ragged = {r.layer: _rec(r.layer, plan)[0] for r in plan if r.segments and len(set(r.segments.sizes)) > 1}
    for layer, seg in ragged.items():
        hits = [p for p in exp.ragged if fnmatch.fnmatchcase(layer, p)]
        assert len(hits) == 1 and exp.ragged[hits[0]] == seg, f"unexpected ragged layer {layer}: {seg}"
    for pattern in exp.ragged:
        assert any(fnmatch.fnmatchcase(layer, pattern) for layer in ragged), f"no ragged layer matches {pattern}"


@pytest.mark.parametrize("name", list(EXPECTED))
def test_real_size_block_plans(name: str) -> None:
    """Every block equals the golden plan of its kind; the kinds cover every block exactly once."""
    exp, plan = EXPECTED[name], meta_plan(name)
    blocks, top = split_by_block(plan)
    covered: list[str] = []
    for kind, (prefixes, golden) in exp.block_kinds.items():
        for prefix in prefixes:
            assert blocks.get(prefix) == golden, f"{name} {kind} block {prefix}"
        covered += prefixes
    assert sorted(covered) == sorted(blocks), f"blocks without a kind: {sorted(set(blocks) - set(covered))}"
    if isinstance(exp.top, list):
        assert top == exp.top
    else:
        used: set[str] = set()
        for layer, seg, dual in top:
            hits = [p for p in exp.top if fnmatch.fnmatchcase(layer, p)]
            assert len(hits) == 1 and exp.top[hits[0]] == (seg, dual), f"{layer}: {(seg, dual)} vs {hits}"
            used.add(hits[0])
        assert used == set(exp.top)


def test_flux_single_stream_proj_out_is_dual_on_the_mlp_segment_only() -> None:
    """Flux.1-dev: every single-stream ``proj_out`` reads cat(attention 3072, GELU-MLP 12288); only the MLP part
    comes from an activation, so DualScale is recorded for that in-segment alone, and nowhere else per segment."""
    plan = meta_plan("flux.1-dev")
    partial = {
        r.layer: (r.segments.sizes if r.segments else None, r.dual_scale)
        for r in plan
        if isinstance(r.dual_scale, tuple)
    }
    assert partial == {f"single_transformer_blocks.{i}.proj_out": ((3072, 12288), (False, True)) for i in range(38)}
    assert plan["single_transformer_blocks.0.proj_out"].dual_mask == (False, True)


def _vm_hwm_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/self/status")


def test_export_on_meta_matches_dispatch_without_memory(caplog: pytest.LogCaptureFixture) -> None:
    """The default capture (torch.export, non-strict) runs on the meta model too, gives the same plan, and the
    process's peak RSS grows by far less than the model's 4.5 GB of bf16 weights (Linux: VmHWM is reset first)."""
    model = build_on_meta("sd3.5-medium")
    reference = meta_plan("sd3.5-medium")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        pytest.skip("cannot reset the RSS high-water mark on this system")
    before = _vm_hwm_bytes()
    with caplog.at_level(logging.INFO, logger="segquant_core.detect"):
        exported = detect(model)
    grown = _vm_hwm_bytes() - before
    assert "with torch.export (non-strict)" in caplog.text
    assert exported == reference
    assert grown < 1 << 30, f"peak RSS grew by {grown / 2**30:.2f} GiB while detecting a meta model"
