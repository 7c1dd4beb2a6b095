"""Shared driver for the real low-bit backends: segments → GEMM groups → quantize x → GEMM → combine.

A concrete backend supplies three things: which layers it takes, how to pack a group's weight codes once,
and one GEMM ``rows(codes) · Wᵀ ⊙ w_scale ⊙ row_scale`` in fp32. DualScale inputs arrive as ``2·M`` stacked
rows (positive codes, then negative codes) so one GEMM call computes both halves; the two halves are then
added with their own scales. Each group carries its own activation quantizer, so in-segments may differ in
DualScale (Flux's single-stream ``proj_out``: only the GELU-MLP part is dual). Bias is added once: inside
the group's GEMM call (or right after it) when the layer is a single group, else after the groups are combined.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from segquant_core.backends.base import Backend
from segquant_core.backends.grouping import GemmGroup, plan_gemms
from segquant_core.formats import QuantFormat, pack_int4
from segquant_core.quantizers import ActivationSpec, encode_activation

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
    def gemm(
        self,
        packed: Any,
        group: GemmGroup,
        codes: torch.Tensor,
        row_scale: torch.Tensor | float,
        bias: torch.Tensor | None,
    ) -> torch.Tensor:
        """``(codes · W_codesᵀ) ⊙ w_scale ⊙ row_scale (+ bias)`` → fp32 ``[R, N_g]``.

        ``codes`` are ``[R, K_g]`` activation codes as produced by :meth:`encode`; ``row_scale`` is a float
        or an fp32 ``[R, 1]`` tensor.
        """

    def unpack(self, packed: Any, group: GemmGroup) -> torch.Tensor | None:
        """The group's int8 codes ``[N_g, K_g]`` re-derived from its packed weight; None if this backend
        cannot (it then keeps ``group.codes``)."""
        return None

    def packed_bytes(self, packed: Any, seen: set[int]) -> int:
        """Bytes of one group's packed kernel state (see :meth:`Backend.state_bytes`)."""
        return 0

    def prepare(self, layer: SegLinear) -> PreparedLayer:
        groups = plan_gemms(layer)
        prepared = [PreparedGroup(g, self.pack(g), g.codes.shape[0]) for g in groups if g.codes is not None]
        fuse = len(groups) == 1 and groups[0].lowrank is None
        bias = layer.bias.float() if layer.bias is not None else None
        if type(self).unpack is not GroupedGemmBackend.unpack:
            for pg in prepared:  # the packed kernel is now the group's only copy of its codes
                pg.group.codes = None
        return PreparedLayer(prepared, bias, fuse and bias is not None)

    def group_codes(self, pg: PreparedGroup) -> torch.Tensor:
        """A group's unpacked codes, re-derived from the kernel when the group no longer holds them."""
        if pg.group.codes is not None:
            return pg.group.codes
        codes = self.unpack(pg.packed, pg.group)
        assert codes is not None
        return codes

    def holds_codes(self, state: Any) -> bool:
        return isinstance(state, PreparedLayer) and all(pg.group.codes is None for pg in state.groups)

    def recover_codes(self, layer: SegLinear, state: Any) -> list[torch.Tensor] | None:
        if not self.holds_codes(state):
            return None
        cfg = layer.cfg
        bounds = cfg.segments.bounds()
        blocks: list[torch.Tensor] = []
        for pg in state.groups:
            codes = self.group_codes(pg)
            if cfg.segments.axis == "in":
                blocks.append(codes)
                continue
            assert pg.group.out_slice is not None
            start = pg.group.out_slice[0]
            for a, b in bounds:
                if pg.group.out_slice[0] <= a and b <= pg.group.out_slice[1]:
                    blocks.append(codes[a - start : b - start].contiguous())
        if len(blocks) != len(bounds):
            raise RuntimeError(f"recovered {len(blocks)} code blocks for {len(bounds)} segments")
        if cfg.weight is not None and cfg.weight.fmt is QuantFormat.INT4:
            return [pack_int4(b) for b in blocks]
        return blocks

    def state_bytes(self, state: Any, seen: set[int]) -> int:
        from segquant_core.seglinear import tensor_bytes_once

        if not isinstance(state, PreparedLayer):
            return 0
        total = 0 if state.bias is None else tensor_bytes_once(state.bias, seen)
        for pg in state.groups:
            g = pg.group
            lowrank = list(g.lowrank) if g.lowrank is not None else []
            for t in (g.codes, g.smooth, g.act_scale, g.w_scale, *lowrank):
                if t is not None:
                    total += tensor_bytes_once(t, seen)
            total += self.packed_bytes(pg.packed, seen)
        return total

    def encode(
        self, x: torch.Tensor, act: ActivationSpec, group: GemmGroup, packed: Any = None
    ) -> tuple[torch.Tensor, float | torch.Tensor]:
        """Activation codes for :meth:`gemm` as ``[P·M, K]`` rows, and the row scale (float or ``[P·M, 1]``).

        This generic version works for every format; int8 backends override it with a fused one-pass encoder.
        """
        xs = x.float()
        if group.smooth is not None:
            xs = xs / group.smooth
        codes, scales = encode_activation(xs, act, group.act_scale)
        parts, m = codes.shape[0], x.shape[0]
        rows = codes.reshape(parts * m, -1)
        if parts == 1 and scales.shape[1] == 1:
            return rows, float(scales.reshape(-1)[0])
        return rows, scales.expand(parts, m, 1).reshape(parts * m, 1)

    def group_output(
        self, pg: PreparedGroup, x: torch.Tensor, act: ActivationSpec, bias: torch.Tensor | None
    ) -> torch.Tensor:
        """One group's quantized GEMM ``[M, N_g]`` in fp32: encode, GEMM, add the DualScale halves.

        ``bias`` is given when this group is the whole layer (it is then added here, fused into the GEMM where
        the kernel can); backends with a faster way to run some case (e.g. DualScale as two fused calls)
        override this.
        """
        m = x.shape[0]
        rows, row_scale = self.encode(x, act, pg.group, pg.packed)
        if isinstance(row_scale, float):
            return self.gemm(pg.packed, pg.group, rows, row_scale, bias)
        y2 = self.gemm(pg.packed, pg.group, rows, row_scale, None)
        y = y2 if y2.shape[0] == m else y2[:m].add_(y2[m:])
        return y.add_(bias) if bias is not None else y

    def run(self, layer: SegLinear, state: PreparedLayer, x: torch.Tensor) -> torch.Tensor:
        m = x.shape[0]
        out: torch.Tensor | None = None
        if layer.cfg.segments.axis == "out" and len(state.groups) > 1:
            out = torch.empty(m, layer.out_features, dtype=torch.float32, device=x.device)
        for pg in state.groups:
            g = pg.group
            xk = x if g.in_slice is None else x[:, g.in_slice[0] : g.in_slice[1]]
            assert g.act is not None
            y = self.group_output(pg, xk, g.act, state.bias if state.fuse_bias else None)
            if g.lowrank is not None:
                xs = xk.float() if g.smooth is None else xk.float() / g.smooth
                y = y + (xs @ g.lowrank[0].float()) @ g.lowrank[1].float()
            if g.out_slice is not None and out is not None:
                out[:, g.out_slice[0] : g.out_slice[1]] = y
            elif out is None:
                out = y
            else:
                out.add_(y)
        assert out is not None
        if state.bias is not None and not state.fuse_bias:
            out = out + state.bias
        return out
