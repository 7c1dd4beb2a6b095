"""Reference backend: fake quantization in fp32 on any device — the ground truth for all other backends.

Per segment: divide the input by the smoothing vector, quantize-dequantize it with the segment's own
activation quantizer (in-segments may differ in DualScale), multiply by the dequantized weight block, add
the low-rank branch computed on the *unquantized* smoothed input, then concatenate (out-segments) or sum
(in-segments), and add the bias once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from segquant_core.backends.base import Backend
from segquant_core.quantizers import fake_quantize_activation

if TYPE_CHECKING:
    from segquant_core.seglinear import SegLinear


class ReferenceBackend(Backend):
    name = "reference"

    def unsupported_reason(self, layer: SegLinear) -> str | None:
        return None

    def run(self, layer: SegLinear, state: Any, x: torch.Tensor) -> torch.Tensor:
        # fp32 for fp32/bf16/fp16 inputs; float64 inputs stay float64 (so the float path is exact there).
        dt = torch.promote_types(x.dtype, torch.float32)
        outs = []
        for seg, xk in zip(layer.segs, layer.segment_inputs(x)):
            xs = xk.to(dt)
            if seg.smooth is not None:
                xs = xs / seg.smooth.to(dt)
            act = seg.activation
            xq = fake_quantize_activation(xs, act, seg.act_scale).to(dt) if act is not None else xs
            w = seg.weight.to(dt) if seg.fmt is None else seg.dequantized_weight().to(dt)
            y = xq @ w.t()
            if seg.lowrank_down is not None:
                y = y + (xs @ seg.lowrank_down.to(dt)) @ seg.lowrank_up.to(dt)
            outs.append(y)
        y = torch.cat(outs, dim=1) if layer.cfg.segments.axis == "out" else torch.stack(outs).sum(dim=0)
        if layer.bias is not None:
            y = y + layer.bias.to(dt)
        return y
