"""Turn one float ``nn.Linear`` plus its calibration statistics into a quantized :class:`SegLinear`.

Per segment: for each candidate α (one when smoothing is off) build the smoothing vector, split off the
low-rank branch, round the weight (RTN), derive the activation scale from the channel statistics, and
score the segment output against the float output on the cached rows. The best α wins; the final
weight is then rounded by RTN or GPTQ. The float layer is only read, never modified.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from segquant_core.calibrate.gptq import gptq_quantize
from segquant_core.calibrate.lowrank import cap_rank, lowrank_split
from segquant_core.calibrate.observer import InputStats
from segquant_core.calibrate.smooth import smoothing_vector
from segquant_core.detect.plan import Segments
from segquant_core.quantizers import (
    ActivationSpec,
    QuantizedWeight,
    activation_scales,
    encode_weight,
    fake_quantize_activation,
)
from segquant_core.recipes import LayerSpec
from segquant_core.seglinear import SegLinear, SegLinearConfig


@dataclass
class SegmentReport:
    alpha: float | None
    errors: dict[float, float] = field(default_factory=dict)  # α → output MSE on the cached rows
    gptq: dict[str, Any] | None = None


@dataclass
class LayerReport:
    layer: str
    segments: list[SegmentReport]
    lowrank_rank: int = 0
    rank_capped: bool = False


@dataclass
class _SegmentResult:
    weight: QuantizedWeight
    smooth: torch.Tensor | None
    act_scale: torch.Tensor | None
    lowrank: tuple[torch.Tensor, torch.Tensor] | None
    report: SegmentReport


def _static_act_scale(act: ActivationSpec, pos: torch.Tensor, neg: torch.Tensor,
                      s: torch.Tensor | None) -> torch.Tensor | None:
    """Static scale(s) of ``x / s`` from per-channel maxima (exact, no re-run)."""
    if act.dynamic:
        return None
    if s is not None:
        pos, neg = pos / s, neg / s
    if act.dual:
        return activation_scales(act, pos.amax().reshape(1), neg.amax().reshape(1)).reshape(-1)
    return activation_scales(act, torch.maximum(pos, neg).amax().reshape(1), None).reshape(-1)


def _build_segment(w: torch.Tensor, x_rows: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor,
                   fit: tuple[torch.Tensor, torch.Tensor], spec: LayerSpec, rank: int,
                   hessian: torch.Tensor | None) -> _SegmentResult:
    """Search α on ``x_rows`` with scales from the ``fit`` maxima, then finalise with all-data maxima.

    Both the smoothing vector and the activation scale of a candidate come from the ``fit`` maxima only:
    ``x_rows`` are held-out rows, and a smoothing vector built from maxima that include them would
    normalise every channel to exactly the held-out range (α → 1 would then never clip while scoring).
    """
    act = spec.activation
    target = x_rows @ w.t() if x_rows.numel() else None
    w_absmax = w.abs().amax(dim=0)
    x_absmax = torch.maximum(pos, neg)
    fit_absmax = torch.maximum(fit[0], fit[1])
    grid = spec.alpha_grid if spec.smooth else (None,)

    def candidate(alpha: float | None, xmax: torch.Tensor):
        s = smoothing_vector(xmax, w_absmax, alpha) if alpha is not None else None
        ws = w * s if s is not None else w
        lr = None
        if rank:
            down, up, ws = lowrank_split(ws, rank)
            lr = (down, up)
        return s, ws, encode_weight(ws, spec.weight), lr

    best: tuple[float, float | None] | None = None
    report = SegmentReport(alpha=None)
    for alpha in grid:
        if target is None or len(grid) == 1:
            err = float("nan")
        else:
            s, _, qw, lr = candidate(alpha, fit_absmax)
            act_scale = _static_act_scale(act, fit[0], fit[1], s) if act is not None else None
            xs = x_rows / s if s is not None else x_rows
            xq = fake_quantize_activation(xs, act, act_scale) if act is not None else xs
            y = xq @ qw.dequantize().t()
            if lr is not None:
                y = y + (xs @ lr[0]) @ lr[1]
            err = float(torch.mean((y - target) ** 2))
        if alpha is not None:
            report.errors[float(alpha)] = err
        key = err if err == err else 0.0  # NaN (nothing to score) keeps the first candidate
        if best is None or key < best[0]:
            best = (key, alpha)
    assert best is not None
    alpha = best[1]
    s, ws, qw, lr = candidate(alpha, x_absmax)
    act_scale = _static_act_scale(act, pos, neg, s) if act is not None else None
    report.alpha = None if alpha is None else float(alpha)
    if spec.gptq and hessian is not None:
        h = hessian / torch.outer(s, s).double() if s is not None else hessian
        qw, info = gptq_quantize(ws, h, spec.weight)
        report.gptq = {"damping": info.damping, "attempts": info.attempts,
                       "fell_back_to_rtn": info.fell_back_to_rtn, "dead_columns": info.dead_columns}
    return _SegmentResult(qw, s, act_scale, lr, report)


def build_seglinear(name: str, linear: nn.Linear, spec: LayerSpec, stats: InputStats) -> tuple[SegLinear, LayerReport]:
    """Quantize ``linear`` according to ``spec`` using ``stats`` gathered on its inputs."""
    n_out, k_in = linear.out_features, linear.in_features
    segments = spec.segments or Segments("out", (n_out,))
    w = linear.weight.detach().float().cpu()
    rows = stats.sample()
    shapes = [(n, k_in) for n in segments.sizes] if segments.axis == "out" else [(n_out, k) for k in segments.sizes]
    rank = min(cap_rank(spec.lowrank, n, k) for n, k in shapes) if spec.lowrank else 0
    if spec.weight.fmt.value == "int4" and any(k % 2 for _, k in shapes):
        raise ValueError(f"{name}: int4 weights need an even input size per segment, got {[k for _, k in shapes]}")
    cfg = SegLinearConfig(k_in, n_out, segments, spec.weight, spec.activation, linear.bias is not None,
                          smooth=spec.smooth, lowrank_rank=rank)
    layer = SegLinear(cfg)
    reports = []
    # A layer reached only by held-out (odd-numbered) calls has no fit maxima: fit on everything it saw.
    fit_pos = stats.fit_pos_max if stats.fit_pos_max is not None else stats.pos_max
    fit_neg = stats.fit_neg_max if stats.fit_neg_max is not None else stats.neg_max
    for seg, (a, b) in zip(layer.segs, segments.bounds()):
        if segments.axis == "out":
            wk, xk, pos, neg = w[a:b], rows, stats.pos_max, stats.neg_max
            fit = (fit_pos, fit_neg)
            hess = stats.hessian(0, k_in) if (spec.gptq and stats.hessians is not None) else None
        else:
            wk, xk, pos, neg = w[:, a:b], rows[:, a:b], stats.pos_max[a:b], stats.neg_max[a:b]
            fit = (fit_pos[a:b], fit_neg[a:b])
            hess = stats.hessian(a, b) if (spec.gptq and stats.hessians is not None) else None
        res = _build_segment(wk, xk, pos, neg, fit, spec, rank, hess)
        seg.weight = res.weight.data
        seg.weight_scale = res.weight.scale
        if res.smooth is not None:
            seg.smooth = res.smooth
        if res.act_scale is not None:
            seg.act_scale = res.act_scale
        if res.lowrank is not None:
            seg.lowrank_down, seg.lowrank_up = res.lowrank
        reports.append(res.report)
    if linear.bias is not None:
        layer.bias = linear.bias.detach().float().cpu().clone()
    capped = bool(spec.lowrank and rank < spec.lowrank)
    return layer, LayerReport(name, reports, rank, capped)


__all__ = ["LayerReport", "SegmentReport", "build_seglinear"]
