"""Shared driver for the real low-bit backends: segments → GEMM groups → quantize x → GEMM → combine.

A concrete backend supplies three things: which layers it takes, how to pack a group's weight codes once,
and one GEMM ``rows(codes) · Wᵀ ⊙ w_scale ⊙ row_scale`` in fp32. DualScale inputs arrive as ``2·M`` stacked
rows (positive codes, then negative codes) so one GEMM call computes both halves; the two halves are then
added with their own scales. Bias is added once, fused into the GEMM when the layer is a single group
with a static single-scale input.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from segquant_core.backends.base import Backend
from segquant_core.backends.grouping import GemmGroup, plan_gemms
from segquant_core.quantizers import encode_activation

if TYPE_CHECKING:
    from segquant_core.seglinear import SegLinear


@dataclass
class PreparedGroup:
    group: GemmGroup
    packed: Any
    n: int


@dataclass
class PreparedLayer:
    groups: list[PreparedGroup]
    bias: torch.Tensor | None
    fuse_bias: bool


class GroupedGemmBackend(Backend):
    """Base for backends that run SegLinear as a few real low-bit GEMMs."""

    @abstractmethod
    def pack(self, group: GemmGroup) -> Any:
        """Prepack a group's weight codes for :meth:`gemm` (done once per layer)."""

    @abstractmethod
    def gemm(self, packed: Any, group: GemmGroup, codes: torch.Tensor, row_scale: torch.Tensor | float,
             bias: torch.Tensor | None) -> torch.Tensor:
        """``(codes · W_codesᵀ) ⊙ w_scale ⊙ row_scale (+ bias)`` → fp32 ``[R, N_g]``.

        ``codes`` are ``[R, K_g]`` activation codes; ``row_scale`` is a float or an fp32 ``[R, 1]`` tensor.
        """

    def prepare(self, layer: SegLinear) -> PreparedLayer:
        groups = plan_gemms(layer)
        prepared = [PreparedGroup(g, self.pack(g), g.codes.shape[0]) for g in groups]
        act = layer.cfg.activation
        fuse = (len(groups) == 1 and act is not None and not act.dual and not act.dynamic
                and groups[0].lowrank is None)
        bias = layer.bias.float() if layer.bias is not None else None
        return PreparedLayer(prepared, bias, fuse and bias is not None)

    def run(self, layer: SegLinear, state: PreparedLayer, x: torch.Tensor) -> torch.Tensor:
        act = layer.cfg.activation
        assert act is not None
        m = x.shape[0]
        out: torch.Tensor | None = None
        if layer.cfg.segments.axis == "out" and len(state.groups) > 1:
            out = torch.empty(m, layer.out_features, dtype=torch.float32, device=x.device)
        for pg in state.groups:
            g = pg.group
            xk = x if g.in_slice is None else x[:, g.in_slice[0]:g.in_slice[1]]
            xs = xk.float()
            if g.smooth is not None:
                xs = xs / g.smooth
            codes, scales = encode_activation(xs, act, g.act_scale)
            parts = codes.shape[0]
            if parts == 1 and scales.shape[1] == 1:
                bias = state.bias if state.fuse_bias else None
                y = self.gemm(pg.packed, g, codes[0], float(scales.reshape(-1)[0]), bias)
            else:
                rows = codes.reshape(parts * m, -1)
                row_scale = scales.expand(parts, m, 1).reshape(parts * m, 1)
                y2 = self.gemm(pg.packed, g, rows, row_scale, None)
                y = y2[:m] if parts == 1 else y2[:m].add_(y2[m:])
            if g.lowrank is not None:
                y = y + (xs @ g.lowrank[0].float()) @ g.lowrank[1].float()
            if g.out_slice is not None and out is not None:
                out[:, g.out_slice[0]:g.out_slice[1]] = y
            elif out is None:
                out = y
            else:
                out.add_(y)
        assert out is not None
        if state.bias is not None and not state.fuse_bias:
            out = out + state.bias
        return out
