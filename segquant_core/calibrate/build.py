"""Turn one float ``nn.Linear`` plus its calibration statistics into a quantized :class:`SegLinear`.

Per segment: for each candidate α (one when smoothing is off) build the smoothing vector, split off the
low-rank branch, round the weight (RTN), derive the activation scale from the channel statistics, and
score the segment output against the float output on the cached rows. The best α wins; the final weight
is then rounded by RTN or GPTQ. The float layer is only read, never modified.

``smooth_scope="segment"`` gives every segment its own α and smoothing vector (the reference's behaviour).
``"layer"`` gives the layer one α (lowest summed output error) and one smoothing vector built from the
whole weight, while each segment keeps its own weight and activation scales. Out-segments then quantize
the same input and run as one GEMM, and α is chosen on all the layer's output error, not on one chunk's.
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


def _static_act_scale(
    act: ActivationSpec, pos: torch.Tensor, neg: torch.Tensor, s: torch.Tensor | None
) -> torch.Tensor | None:
    """Static scale(s) of ``x / s`` from per-channel maxima (exact, no re-run)."""
    if act.dynamic:
        return None
    if s is not None:
        pos, neg = pos / s, neg / s
    if act.dual:
        return activation_scales(act, pos.amax().reshape(1), neg.amax().reshape(1)).reshape(-1)
    return activation_scales(act, torch.maximum(pos, neg).amax().reshape(1), None).reshape(-1)


@dataclass
class _SegmentInputs:
    """Everything the α search and the final rounding of one segment read."""

    w: torch.Tensor
    x_rows: torch.Tensor
    pos: torch.Tensor
    neg: torch.Tensor
    fit: tuple[torch.Tensor, torch.Tensor]
    hessian: torch.Tensor | None  # Σ xxᵀ (a view into the layer's statistics; never written)
    hessian_count: int
    w_absmax: torch.Tensor  # per input channel, of this segment's weight or (layer scope) the whole layer's

    def candidate(self, spec: LayerSpec, alpha: float | None, xmax: torch.Tensor, rank: int):
        """Smoothing vector, smoothed weight, its RTN rounding and the low-rank branch for one α."""
        s = smoothing_vector(xmax, self.w_absmax, alpha) if alpha is not None else None
        ws = self.w * s if s is not None else self.w
        lr = None
        if rank:
            down, up, ws = lowrank_split(ws, rank)
            lr = (down, up)
        return s, ws, encode_weight(ws, spec.weight), lr


def _score_alphas(
    seg: _SegmentInputs, spec: LayerSpec, act: ActivationSpec | None, rank: int
) -> dict[float | None, float]:
    """Output MSE of every α candidate on the held-out rows, with scales from the ``fit`` maxima only.

    ``x_rows`` are held-out rows, and a smoothing vector built from maxima that include them would
    normalise every channel to exactly the held-out range (α → 1 would then never clip while scoring).
    NaN means there was nothing to score (no rows, or a single candidate). ``act`` is the segment's own
    activation quantizer (in-segments may differ in DualScale).
    """
    grid = spec.alpha_grid if spec.smooth else (None,)
    if not seg.x_rows.numel() or len(grid) == 1:
        return {a: float("nan") for a in grid}
    target = seg.x_rows @ seg.w.t()
    fit_absmax = torch.maximum(seg.fit[0], seg.fit[1])
    errors: dict[float | None, float] = {}
    for alpha in grid:
        s, _, qw, lr = seg.candidate(spec, alpha, fit_absmax, rank)
        act_scale = _static_act_scale(act, seg.fit[0], seg.fit[1], s) if act is not None else None
        xs = seg.x_rows / s if s is not None else seg.x_rows
        xq = fake_quantize_activation(xs, act, act_scale) if act is not None else xs
        y = xq @ qw.dequantize().t()
        if lr is not None:
            y = y + (xs @ lr[0]) @ lr[1]
        errors[alpha] = float(torch.mean((y - target) ** 2))
    return errors


def _best_alpha(errors: dict[float | None, float]) -> float | None:
    """Lowest error wins; with nothing scored (all NaN) the first candidate is kept."""
    scored = {a: e for a, e in errors.items() if e == e}
    if not scored:
        return next(iter(errors))
    return min(scored, key=scored.__getitem__)


def _finalise_segment(
    seg: _SegmentInputs,
    spec: LayerSpec,
    act: ActivationSpec | None,
    rank: int,
    alpha: float | None,
    errors: dict[float | None, float],
) -> _SegmentResult:
    """Build the chosen α with all-data maxima, then round the weight by RTN or GPTQ."""
    s, ws, qw, lr = seg.candidate(spec, alpha, torch.maximum(seg.pos, seg.neg), rank)
    act_scale = _static_act_scale(act, seg.pos, seg.neg, s) if act is not None else None
    report = SegmentReport(
        alpha=None if alpha is None else float(alpha), errors={float(a): e for a, e in errors.items() if a is not None}
    )
    if spec.gptq and seg.hessian is not None:
        # One new K×K matrix: E[(x/s)(x/s)ᵀ] = Σ xxᵀ / (s sᵀ) / n, which GPTQ then consumes in place.
        h = seg.hessian / s.unsqueeze(1) if s is not None else seg.hessian.clone()
        if s is not None:
            h.div_(s.unsqueeze(0))
        h.div_(max(seg.hessian_count, 1))
        qw, info = gptq_quantize(ws, h, spec.weight, overwrite_hessian=True)
        del h
        report.gptq = {
            "damping": info.damping,
            "attempts": info.attempts,
            "fell_back_to_rtn": info.fell_back_to_rtn,
            "dead_columns": info.dead_columns,
        }
    return _SegmentResult(qw, s, act_scale, lr, report)


def _choose_alphas(
    per_segment: list[dict[float | None, float]], sizes: tuple[int, ...], scope: str
) -> list[float | None]:
    """One α per segment (``segment``), or the α with the lowest summed output error for all (``layer``).

    The shared choice weighs each segment's MSE by its number of output elements, so it minimises the
    error of the whole layer output.
    """
    if scope == "segment" or len(per_segment) == 1:
        return [_best_alpha(e) for e in per_segment]
    total: dict[float | None, float] = {}
    for errors, n in zip(per_segment, sizes):
        for a, e in errors.items():
            total[a] = total.get(a, 0.0) + e * n
    return [_best_alpha(total)] * len(per_segment)


def build_seglinear(name: str, linear: nn.Linear, spec: LayerSpec, stats: InputStats) -> tuple[SegLinear, LayerReport]:
    """Quantize ``linear`` according to ``spec`` using ``stats`` gathered on its inputs."""
    n_out, k_in = linear.out_features, linear.in_features
    segments = spec.segments or Segments("out", (n_out,))
    w = linear.weight.detach().float()  # on the statistics' (= the model's) device
    rows = stats.sample()
    shapes = [(n, k_in) for n in segments.sizes] if segments.axis == "out" else [(n_out, k) for k in segments.sizes]
    rank = min(cap_rank(spec.lowrank, n, k) for n, k in shapes) if spec.lowrank else 0
    if spec.weight.fmt.value == "int4" and any(k % 2 for _, k in shapes):
        raise ValueError(f"{name}: int4 weights need an even input size per segment, got {[k for _, k in shapes]}")
    cfg = SegLinearConfig(
        k_in,
        n_out,
        segments,
        spec.weight,
        spec.activation,
        linear.bias is not None,
        smooth=spec.smooth,
        lowrank_rank=rank,
        dual_segments=spec.dual_segments,
    )
    layer = SegLinear(cfg)
    reports = []
    # A layer reached only by held-out (odd-numbered) calls has no fit maxima: fit on everything it saw.
    fit_pos = stats.fit_pos_max if stats.fit_pos_max is not None else stats.pos_max
    fit_neg = stats.fit_neg_max if stats.fit_neg_max is not None else stats.neg_max
    inputs: list[_SegmentInputs] = []
    layer_w_absmax = w.abs().amax(dim=0)  # column maxima of the whole weight (layer scope)
    shared = spec.smooth_scope == "layer"
    for a, b in segments.bounds():
        want_h = spec.gptq and stats.hessians is not None
        if segments.axis == "out":
            wk = w[a:b]
            inputs.append(
                _SegmentInputs(
                    wk,
                    rows,
                    stats.pos_max,
                    stats.neg_max,
                    (fit_pos, fit_neg),
                    stats.hessian_sum(0, k_in) if want_h else None,
                    stats.count,
                    layer_w_absmax if shared else wk.abs().amax(dim=0),
                )
            )
        else:  # an in-segment's column maxima are the same slice either way
            inputs.append(
                _SegmentInputs(
                    w[:, a:b],
                    rows[:, a:b],
                    stats.pos_max[a:b],
                    stats.neg_max[a:b],
                    (fit_pos[a:b], fit_neg[a:b]),
                    stats.hessian_sum(a, b) if want_h else None,
                    stats.count,
                    layer_w_absmax[a:b],
                )
            )
    acts = cfg.segment_activations()
    errors = [_score_alphas(seg_in, spec, act, rank) for seg_in, act in zip(inputs, acts)]
    alphas = _choose_alphas(errors, segments.sizes, spec.smooth_scope)
    for seg, seg_in, act, alpha, errs in zip(layer.segs, inputs, acts, alphas, errors):
        res = _finalise_segment(seg_in, spec, act, rank, alpha, errs)
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
        layer.bias = linear.bias.detach().float().clone()
    capped = bool(spec.lowrank and rank < spec.lowrank)
    return layer, LayerReport(name, reports, rank, capped)


__all__ = ["LayerReport", "SegmentReport", "build_seglinear"]
