"""fp8 (e4m3) backend on ``torch._scaled_mm`` with row-wise activation and column-wise weight scales.

Runs on CUDA sm_89+ (Ada, Hopper) where it uses fp8 tensor cores, and on CPU (correct but not faster than
fp32 — useful so the fp8 recipe runs real fp8 codes everywhere). Scales are passed row-wise (``[R, 1]``)
and column-wise (``[1, N]``) so per-token activations and per-channel / per-segment weights share one path.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from segquant_core.backends.grouped import GroupedGemmBackend
from segquant_core.backends.grouping import GemmGroup
from segquant_core.formats import QuantFormat

if TYPE_CHECKING:
    from segquant_core.seglinear import SegLinear


def _cuda_fp8_capable(device: torch.device) -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability(device) >= (8, 9)


class ScaledMMFp8Backend(GroupedGemmBackend):
    name = "scaled-mm-fp8"

    def unsupported_reason(self, layer: SegLinear) -> str | None:
        cfg = layer.cfg
        if cfg.weight is None or cfg.weight.fmt is not QuantFormat.FP8_E4M3:
            return "weights are not fp8 e4m3"
        if cfg.activation is None or cfg.activation.fmt is not QuantFormat.FP8_E4M3:
            return "activations are not fp8 e4m3"
        device = layer.device
        if device.type == "cuda":
            if not _cuda_fp8_capable(device):
                return "fp8 GEMM needs a CUDA device of compute capability 8.9 or newer"
            if any(k % 16 or n % 16 for n, k in cfg.segment_shapes()):
                return "fp8 GEMM needs every segment's K and N to be multiples of 16"
        return None

    def pack(self, group: GemmGroup) -> Any:
        return group.codes.contiguous().t(), group.w_scale.reshape(1, -1).contiguous()

    def gemm(
        self,
        packed: Any,
        group: GemmGroup,
        codes: torch.Tensor,
        row_scale: torch.Tensor | float,
        bias: torch.Tensor | None,
    ) -> torch.Tensor:
        w_t, w_scale = packed
        rows = codes.shape[0]
        if isinstance(row_scale, float):
            a_scale = torch.full((rows, 1), row_scale, dtype=torch.float32, device=codes.device)
        else:
            a_scale = row_scale.float().expand(rows, 1).contiguous()
        y = torch._scaled_mm(codes.contiguous(), w_t, scale_a=a_scale, scale_b=w_scale, out_dtype=torch.float32)
        return y.add_(bias) if bias is not None else y
