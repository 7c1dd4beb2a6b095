"""The activation statistics that explain an ablation ladder: why segments or DualScale help on a model.

SegQuant's two ideas pay off only where a model's activations have the structure they target, so the
ladder of one model is read next to three measurements taken on its own calibration calls (float model):

* **chunk ranges** of out-segmented layers (AdaLN modulation, GEGLU halves): the absolute maximum of each
  chunk of the layer's output and of its weight rows. ``ratio`` = largest / smallest chunk: one per-tensor
  scale wastes ``log2(ratio)`` bits on the small chunks, which SegLinear's per-chunk scales recover;
* **negative tails** of DualScale inputs (after SiLU / GELU), per in-segment for ragged inputs such as
  Flux's single-stream ``proj_out`` (attention | GELU-MLP): the most negative and most positive value, and
  how many int8 codes the negative side gets under one symmetric scale (``neg_codes``) — DualScale gives
  it 128;
* **head ranges** of per-head in-segmented layers (attention ``to_out``): each head's input absolute
  maximum; ``spread`` = largest / smallest head.

One pass over the recorded calls with hooks; nothing is kept but per-channel maxima.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from segquant_core.calibrate.capture import run_calls
from segquant_core.detect.plan import LayerPlan, Plan

INT8_POSITIVE_CODES = 127


def _ratio(values: Sequence[float]) -> float:
    low = min(values)
    return max(values) / low if low > 0 else float("inf")


@dataclass
class ChunkRanges:
    """One out-segmented layer: per-chunk absolute maxima of its output and of its weight rows."""

    layer: str
    output_absmax: list[float]
    weight_absmax: list[float]

    @property
    def ratio(self) -> float:
        return _ratio(self.output_absmax)

    @property
    def weight_ratio(self) -> float:
        return _ratio(self.weight_absmax)


@dataclass
class NegativeTail:
    """One input segment of a DualScale layer (the whole input when it is not in-segmented)."""

    layer: str
    segment: int
    dual: bool  # whether the plan gives this segment DualScale
    source: str  # "SiLU" or "GELU" (GEGLU included), as detection found it; "" when the plan does not say
    neg_min: float
    pos_max: float

    @property
    def neg_codes(self) -> float:
        """Int8 codes the negative side spans under one symmetric scale (DualScale: 128)."""
        amax = max(self.pos_max, -self.neg_min)
        return INT8_POSITIVE_CODES * -self.neg_min / amax if amax > 0 else 0.0


@dataclass
class HeadRanges:
    """One per-head in-segmented layer: each head's input absolute maximum."""

    layer: str
    input_absmax: list[float]
    weight_absmax: list[float]

    @property
    def spread(self) -> float:
        return _ratio(self.input_absmax)

    @property
    def weight_spread(self) -> float:
        return _ratio(self.weight_absmax)


def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def _max(values: Sequence[float]) -> float | None:
    return max(values) if values else None


@dataclass
class ActivationStats:
    samples: int
    chunks: list[ChunkRanges] = field(default_factory=list)
    tails: list[NegativeTail] = field(default_factory=list)
    heads: list[HeadRanges] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """Medians and maxima per kind: the small table docs/results.md shows per model."""
        adaln = [c for c in self.chunks if _is_modulation(c.layer)]
        other = [c for c in self.chunks if not _is_modulation(c.layer)]
        silu = [t for t in self.tails if t.dual and t.source == "SiLU"]
        gelu = [t for t in self.tails if t.dual and t.source == "GELU"]
        plain_parts = [t for t in self.tails if not t.dual]
        return {
            "samples": self.samples,
            "adaln_layers": len(adaln),
            "adaln_chunk_ratio_median": _median([c.ratio for c in adaln]),
            "adaln_chunk_ratio_max": _max([c.ratio for c in adaln]),
            "adaln_weight_ratio_median": _median([c.weight_ratio for c in adaln]),
            "other_out_segment_layers": len(other),
            "other_chunk_ratio_median": _median([c.ratio for c in other]),
            "other_weight_ratio_median": _median([c.weight_ratio for c in other]),
            "silu_inputs": len(silu),
            "silu_neg_codes_median": _median([t.neg_codes for t in silu]),
            "gelu_inputs": len(gelu),
            "gelu_neg_min_median": _median([t.neg_min for t in gelu]),
            "gelu_pos_max_median": _median([t.pos_max for t in gelu]),
            "gelu_neg_codes_median": _median([t.neg_codes for t in gelu]),
            "gelu_neg_codes_min": min((t.neg_codes for t in gelu), default=None),
            "non_dual_segments_of_dual_layers": len(plain_parts),
            "non_dual_segment_neg_codes_median": _median([t.neg_codes for t in plain_parts]),
            "head_layers": len(self.heads),
            "head_spread_median": _median([h.spread for h in self.heads]),
            "head_spread_max": _max([h.spread for h in self.heads]),
            "head_weight_spread_median": _median([h.weight_spread for h in self.heads]),
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "summary": self.summary(),
            "chunks": [asdict(c) | {"ratio": c.ratio, "weight_ratio": c.weight_ratio} for c in self.chunks],
            "tails": [asdict(t) | {"neg_codes": t.neg_codes} for t in self.tails],
            "heads": [asdict(h) | {"spread": h.spread, "weight_spread": h.weight_spread} for h in self.heads],
        }


def _is_modulation(layer: str) -> bool:
    """AdaLN modulation linears are named ``norm*.linear`` in diffusers' DiTs (``norm_out.linear`` too)."""
    return ".norm" in f".{layer}" and layer.endswith("linear")


def activation_source(record: LayerPlan) -> str:
    """Which activation feeds a DualScale input, read from detection's reasons (GEGLU counts as GELU)."""
    said = " ".join(record.reasons)
    return next((name for name in ("GELU", "SiLU") if name in said), "")


def is_per_head(record: LayerPlan) -> bool:
    """In-segments that are attention heads (a ``(…, H, D) → (…, H·D)`` reshape), not a concatenation."""
    seg = record.segments
    return seg is not None and seg.axis == "in" and any("per-head reshape" in r for r in record.reasons)


def dual_flags(record: LayerPlan) -> tuple[bool, ...]:
    """One DualScale flag per input segment (one for the layer when its input is not cut)."""
    parts = record.segments.count if record.segments is not None and record.segments.axis == "in" else 1
    flags = record.dual_scale
    if isinstance(flags, tuple):
        return tuple(bool(f) for f in flags)
    return (bool(flags),) * parts


class _ChannelExtremes:
    """Running per-channel max and min of a tensor's last dimension, in fp32."""

    def __init__(self) -> None:
        self.high: torch.Tensor | None = None
        self.low: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1, x.shape[-1])
        high, low = flat.amax(0).float(), flat.amin(0).float()
        self.high = high if self.high is None else torch.maximum(self.high, high)
        self.low = low if self.low is None else torch.minimum(self.low, low)

    def absmax(self) -> torch.Tensor:
        assert self.high is not None and self.low is not None, "the layer never ran"
        return torch.maximum(self.high, -self.low)


def _per_segment_absmax(values: torch.Tensor, bounds: list[tuple[int, int]]) -> list[float]:
    return [float(values[a:b].max()) for a, b in bounds]


def collect_activation_stats(model: nn.Module, plan: Plan, calls: Sequence[dict[str, Any]]) -> ActivationStats:
    """Run ``calls`` through the float ``model`` and measure chunk ranges, negative tails and head ranges.

    Only the plan's segmented or DualScale layers are watched. Per-head layers and activation sources are
    told by detection's reasons (``Plan`` records from :func:`detect`); ragged in-segmented DualScale inputs
    report each segment's tail.
    """
    modules = dict(model.named_modules())
    inputs: dict[str, _ChannelExtremes] = {}
    outputs: dict[str, _ChannelExtremes] = {}
    handles = []
    for record in plan:
        module = modules.get(record.layer)
        if module is None:
            continue
        seg = record.segments
        if seg is not None and seg.axis == "out":
            outputs[record.layer] = _ChannelExtremes()
            handles.append(module.register_forward_hook(lambda _m, _a, y, s=outputs[record.layer]: s.update(y)))
        if any(dual_flags(record)) or (seg is not None and seg.axis == "in"):
            inputs[record.layer] = _ChannelExtremes()
            handles.append(module.register_forward_pre_hook(lambda _m, a, s=inputs[record.layer]: s.update(a[0])))
    try:
        run_calls(model, calls, progress=False)
    finally:
        for handle in handles:
            handle.remove()

    stats = ActivationStats(samples=len(calls))
    for record in plan:
        weight = getattr(modules.get(record.layer), "weight", None)
        if weight is None:
            continue
        weight = weight.detach().float().abs()
        seg = record.segments
        if record.layer in outputs:
            bounds = seg.bounds()
            rows = weight.amax(1)
            stats.chunks.append(
                ChunkRanges(
                    record.layer,
                    _per_segment_absmax(outputs[record.layer].absmax(), bounds),
                    _per_segment_absmax(rows, bounds),
                )
            )
        if record.layer not in inputs:
            continue
        seen = inputs[record.layer]
        assert seen.high is not None and seen.low is not None, f"{record.layer} never ran"
        flags = dual_flags(record)
        bounds = seg.bounds() if seg is not None and seg.axis == "in" else [(0, seen.high.numel())]
        if any(flags):
            for index, ((a, b), dual) in enumerate(zip(bounds, flags)):
                low, high = float(seen.low[a:b].min()), float(seen.high[a:b].max())
                source = activation_source(record) if dual else ""
                stats.tails.append(NegativeTail(record.layer, index, dual, source, low, high))
        elif is_per_head(record):
            columns = weight.amax(0)
            stats.heads.append(
                HeadRanges(
                    record.layer,
                    _per_segment_absmax(seen.absmax(), bounds),
                    _per_segment_absmax(columns, bounds),
                )
            )
    return stats


def format_stats(stats: ActivationStats) -> str:
    """A short plain-text report: the summary, then one line per watched layer."""

    def num(value: float | None) -> str:
        return "—" if value is None else f"{value:.3g}"

    s = stats.summary()
    lines = [
        f"activation statistics over {stats.samples} calibration calls (float model)",
        f"AdaLN chunk ranges: {s['adaln_layers']} layers, output max/min chunk ratio median "
        f"{num(s['adaln_chunk_ratio_median'])} (max {num(s['adaln_chunk_ratio_max'])}), weight rows "
        f"{num(s['adaln_weight_ratio_median'])}",
        f"other out-segments: {s['other_out_segment_layers']} layers, chunk ratio median "
        f"{num(s['other_chunk_ratio_median'])}, weight {num(s['other_weight_ratio_median'])}",
        f"GELU-fed DualScale inputs: {s['gelu_inputs']}, min median {num(s['gelu_neg_min_median'])} vs max median "
        f"{num(s['gelu_pos_max_median'])}; negative side under one int8 scale: median "
        f"{num(s['gelu_neg_codes_median'])} codes (min {num(s['gelu_neg_codes_min'])}; DualScale: 128)",
        f"SiLU-fed DualScale inputs: {s['silu_inputs']}, negative side under one int8 scale: median "
        f"{num(s['silu_neg_codes_median'])} codes; segments of those layers without DualScale: "
        f"{s['non_dual_segments_of_dual_layers']} (median {num(s['non_dual_segment_neg_codes_median'])} codes)",
        f"per-head inputs: {s['head_layers']} layers, head max/min spread median {num(s['head_spread_median'])} "
        f"(max {num(s['head_spread_max'])}), weight columns {num(s['head_weight_spread_median'])}",
        "",
        "layer                                              kind    values",
    ]
    for c in stats.chunks:
        chunks = " ".join(f"{v:.3g}" for v in c.output_absmax)
        lines.append(f"{c.layer:<50} chunks  ratio {c.ratio:6.2f}  [{chunks}]")
    for t in stats.tails:
        lines.append(
            f"{t.layer:<50} tail    seg {t.segment} {t.source or 'no dual'}  min {t.neg_min:.3g}  "
            f"max {t.pos_max:.3g}  neg codes {t.neg_codes:.1f}"
        )
    for h in stats.heads:
        lines.append(f"{h.layer:<50} heads   spread {h.spread:6.2f}  [{' '.join(f'{v:.3g}' for v in h.input_absmax)}]")
    return "\n".join(lines)
