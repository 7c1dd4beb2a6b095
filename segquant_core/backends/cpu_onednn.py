"""CPU int8 backend on oneDNN's prepacked quantized linear (VNNI / AMX kernels).

oneDNN runs its fast u8×s8 kernels when activations are *unsigned* with a zero point; our symmetric int8
activation codes are shifted by 128 into uint8 (zero point 128), which is exact. Weights are prepacked
once at load; per-output-column weight scales (per-segment scales folded into one vector) and, for a
static single-scale input, the activation scale and the bias are applied inside the same call. int4
weights are unpacked to int8 for the GEMM (no faster CPU int4 path at these shapes). Small M is fine.
The same op with *signed* int8 activations falls back to a reference loop ~1000× slower, hence the shift.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from segquant_core.backends.fused_quant import encode_rows
from segquant_core.backends.grouped import GroupedGemmBackend
from segquant_core.backends.grouping import GemmGroup
from segquant_core.quantizers import ActivationSpec

if TYPE_CHECKING:
    from segquant_core.seglinear import SegLinear


class OneDNNInt8Backend(GroupedGemmBackend):
    name = "cpu-onednn-int8"

    @classmethod
    def available(cls) -> bool:
        return (torch.backends.mkldnn.is_available() and hasattr(torch.ops, "onednn")
                and hasattr(torch.ops.onednn, "qlinear_prepack"))

    def unsupported_reason(self, layer: SegLinear) -> str | None:
        cfg = layer.cfg
        if not self.available():
            return "oneDNN quantized linear ops are not in this torch build"
        if layer.segs[0].weight.device.type != "cpu":
            return "layer is not on the CPU"
        if cfg.weight is None or not cfg.weight.fmt.is_int:
            return "weights are not int8/int4"
        if cfg.activation is None or cfg.activation.fmt.value != "int8":
            return "activations are not int8"
        return None

    def pack(self, group: GemmGroup) -> Any:
        return torch.ops.onednn.qlinear_prepack(group.codes.contiguous(), None)

    def encode(self, x: torch.Tensor, act: ActivationSpec,
               group: GemmGroup) -> tuple[torch.Tensor, float | torch.Tensor]:
        return encode_rows(x, act, group.act_scale, group.smooth, unsigned=True)

    def gemm(self, packed: Any, group: GemmGroup, codes: torch.Tensor, row_scale: torch.Tensor | float,
             bias: torch.Tensor | None) -> torch.Tensor:
        x_u8 = codes  # already shifted into uint8 by encode()
        n = group.w_scale.numel()
        zps = torch.zeros(n, dtype=torch.int64)
        scalar = isinstance(row_scale, float)
        y = torch.ops.onednn.qlinear_pointwise(
            x_u8, row_scale if scalar else 1.0, 128, packed, group.w_scale, zps, bias,
            1.0, 0, torch.float32, "none", [], "")
        return y if scalar else y.mul_(row_scale)
