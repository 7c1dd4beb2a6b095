"""int8 backend on ``torch._int_mm`` (exact int32 accumulation) — CUDA (cuBLAS) and CPU (oneDNN).

The dequantizing epilogue (per-column weight scales × per-row activation scales, bias) runs as a few fp32
element-wise ops after the GEMM; the fused Triton kernel is a separate backend. cuBLAS requires more than
16 rows and K, N multiples of 8: small-M calls (AdaLN / timestep linears, M = batch) are zero-padded to
32 rows, which costs little because such GEMMs are bound by reading the weight.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from segquant_core.backends.fused_quant import encode_rows
from segquant_core.backends.grouped import GroupedGemmBackend
from segquant_core.backends.grouping import GemmGroup
from segquant_core.quantizers import ActivationSpec

if TYPE_CHECKING:
    from segquant_core.seglinear import SegLinear

_CUDA_MIN_ROWS = 32


class IntMMBackend(GroupedGemmBackend):
    name = "int-mm"

    def unsupported_reason(self, layer: SegLinear) -> str | None:
        cfg = layer.cfg
        if cfg.weight is None or not cfg.weight.fmt.is_int:
            return "weights are not int8/int4"
        if cfg.activation is None or cfg.activation.fmt.value != "int8":
            return "activations are not int8"
        if layer.device.type == "cuda":
            shapes = cfg.segment_shapes()
            if any(k % 8 or n % 8 for n, k in shapes):
                return "cuBLAS int8 GEMM needs every segment's K and N to be multiples of 8"
        return None

    def encode(
        self, x: torch.Tensor, act: ActivationSpec, group: GemmGroup, packed: Any = None
    ) -> tuple[torch.Tensor, float | torch.Tensor]:
        return encode_rows(x, act, group.act_scale, group.smooth, unsigned=False)

    def pack(self, group: GemmGroup) -> Any:
        # [N, K] row-major viewed as a column-major [K, N] operand.
        assert group.codes is not None
        return group.codes.contiguous().t()

    def unpack(self, packed: Any, group: GemmGroup) -> torch.Tensor | None:
        return packed.t()  # the packed operand is the codes themselves, transposed

    def packed_bytes(self, packed: Any, seen: set[int]) -> int:
        from segquant_core.seglinear import tensor_bytes_once

        return tensor_bytes_once(packed, seen)

    def gemm(
        self,
        packed: Any,
        group: GemmGroup,
        codes: torch.Tensor,
        row_scale: torch.Tensor | float,
        bias: torch.Tensor | None,
    ) -> torch.Tensor:
        rows = codes.shape[0]
        a = codes.contiguous()
        if a.is_cuda and rows < _CUDA_MIN_ROWS:
            a = F.pad(a, (0, 0, 0, _CUDA_MIN_ROWS - rows))
        acc = torch._int_mm(a, packed)[:rows]
        y = acc.float().mul_(group.w_scale)
        y = y.mul_(row_scale)
        return y.add_(bias) if bias is not None else y
