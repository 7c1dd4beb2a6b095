"""Turn a SegLinear's segments into the fewest GEMMs that compute it exactly.

Out-segments that see the *same* quantized input (equal smoothing vectors or none, equal static activation
scales, no low-rank branch) collapse into one GEMM: their weight blocks are stacked along N and the
per-segment weight scales become one per-output-column epilogue vector. Everything else — in-segments,
and out-segments with their own smoothing — is one GEMM per segment, accumulated (in) or placed (out).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from segquant_core.quantizers import ActivationSpec

if TYPE_CHECKING:
    from segquant_core.seglinear import QuantSegment, SegLinear


@dataclass
class GemmGroup:
    """One GEMM: ``y[:, out] (+)= Q(x[:, in] / smooth) · codesᵀ ⊙ w_scale (+ low-rank)``."""

    in_slice: tuple[int, int] | None  # None: the whole input
    out_slice: tuple[int, int] | None  # None: accumulate into the whole output (in-segments)
    smooth: torch.Tensor | None
    act: ActivationSpec | None  # the group's activation quantizer (in-segments may differ in DualScale)
    act_scale: torch.Tensor | None  # static scales [P]; None when dynamic
    codes: torch.Tensor | None  # unpacked weight codes [N_g, K_g] (int8 or float8); None once a kernel holds them
    w_scale: torch.Tensor  # fp32 [N_g], one per output column
    lowrank: tuple[torch.Tensor, torch.Tensor] | None


def _column_scales(seg: QuantSegment, n: int) -> torch.Tensor:
    assert seg.weight_scale is not None
    return (
        seg.weight_scale.float().expand(n).contiguous()
        if seg.weight_scale.numel() == 1
        else seg.weight_scale.float().contiguous()
    )


def _same_input(a: QuantSegment, b: QuantSegment) -> bool:
    if a.lowrank_down is not None or b.lowrank_down is not None:
        return False
    if (a.smooth is None) != (b.smooth is None) or (a.smooth is not None and not torch.equal(a.smooth, b.smooth)):
        return False
    if (a.act_scale is None) != (b.act_scale is None):
        return False
    return a.act_scale is None or torch.equal(a.act_scale, b.act_scale)


def plan_gemms(layer: SegLinear) -> list[GemmGroup]:
    """GEMM groups for ``layer`` (weights must be quantized)."""
    cfg = layer.cfg
    bounds = cfg.segments.bounds()
    groups: list[GemmGroup] = []
    if cfg.segments.axis == "in":
        for seg, (a, b) in zip(layer.segs, bounds):
            lr = (seg.lowrank_down, seg.lowrank_up) if seg.lowrank_down is not None else None
            groups.append(
                GemmGroup(
                    (a, b),
                    None,
                    seg.smooth,
                    seg.activation,
                    seg.act_scale,
                    seg.quantized_weight().codes(),
                    _column_scales(seg, cfg.out_features),
                    lr,
                )
            )
        return groups
    # out-segments: merge runs of segments that share their quantized input
    run: list[int] = []

    def flush() -> None:
        if not run:
            return
        first = layer.segs[run[0]]
        a, b = bounds[run[0]][0], bounds[run[-1]][1]
        codes = torch.cat([layer.segs[i].quantized_weight().codes() for i in run])
        scales = torch.cat([_column_scales(layer.segs[i], bounds[i][1] - bounds[i][0]) for i in run])
        lr = (first.lowrank_down, first.lowrank_up) if first.lowrank_down is not None else None
        groups.append(GemmGroup(None, (a, b), first.smooth, first.activation, first.act_scale, codes, scales, lr))
        run.clear()

    for i, seg in enumerate(layer.segs):
        if run and not _same_input(layer.segs[run[-1]], seg):
            flush()
        run.append(i)
    flush()
    return groups
