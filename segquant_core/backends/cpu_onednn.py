"""CPU int8 backend: oneDNN's prepacked quantized linear or ``torch._int_mm``, whichever is faster per shape.

oneDNN runs its fast u8×s8 VNNI kernels when activations are *unsigned* with a zero point; our symmetric
int8 codes are shifted by 128 into uint8 (zero point 128), which is exact, and per-output-column weight scales
(per-segment scales folded into one vector), the activation scale and the bias are applied in the same call.
The same op with *signed* activations falls back to a reference loop ~1000× slower, hence the shift.

Neither kernel wins everywhere on this class of CPU: prepacked oneDNN is faster at 1024×1536×{1536, 6144},
``_int_mm`` (s8×s8 → s32, then a scaling pass) at K ≥ 4096 and at M ≥ 2048 (measured, ENVIRONMENT.md). The
default picks by that shape rule, which is deterministic: the same artifact gives bit-identical outputs in
every process. ``SEGQUANT_CPU_GEMM=autotune`` instead times both once per power-of-two bucket of M on the
real input and keeps the faster (fastest, but the choice — and so the last bits — can differ between runs);
``onednn`` or ``int_mm`` forces one. int4 weights are unpacked to int8 for the GEMM (no faster CPU int4 path at these
shapes); small M is fine for both kernels.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from segquant_core.backends.fused_quant import encode_rows
from segquant_core.backends.grouped import GroupedGemmBackend
from segquant_core.backends.grouping import GemmGroup
from segquant_core.quantizers import ActivationSpec

if TYPE_CHECKING:
    from segquant_core.seglinear import SegLinear


@dataclass
class CpuPacked:
    """A group's weight for both kernels, and which one won per power-of-two bucket of M."""

    onednn: torch.Tensor  # prepacked oneDNN weight
    w_t: torch.Tensor  # int8 [K, N] (column-major view of [N, K]) for torch._int_mm
    zero_points: torch.Tensor
    choice: dict[int, str] = field(default_factory=dict)


class OneDNNInt8Backend(GroupedGemmBackend):
    name = "cpu-onednn-int8"  # (name kept for artifacts/tests; it picks oneDNN or _int_mm per shape)

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

    def pack(self, group: GemmGroup) -> CpuPacked:
        codes = group.codes.contiguous()
        zps = torch.zeros(codes.shape[0], dtype=torch.int64)
        return CpuPacked(torch.ops.onednn.qlinear_prepack(codes, None), codes.t(), zps)

    def _choose(self, packed: CpuPacked, x: torch.Tensor, act: ActivationSpec, group: GemmGroup) -> str:
        mode = os.environ.get("SEGQUANT_CPU_GEMM", "rule")
        if mode in ("onednn", "int_mm"):
            return mode
        if mode != "autotune":
            return "int_mm" if (group.codes.shape[1] >= 4096 or x.shape[0] >= 2048) else "onednn"
        bucket = max(1, x.shape[0]).bit_length()
        choice = packed.choice.get(bucket)
        if choice is None:
            timings = {}
            for kind in ("onednn", "int_mm"):
                rows, scale = encode_rows(x, act, group.act_scale, group.smooth, unsigned=kind == "onednn")
                best = float("inf")
                for _ in range(2):
                    t0 = time.perf_counter()
                    self._gemm(packed, group, rows, scale, None)
                    best = min(best, time.perf_counter() - t0)
                timings[kind] = best
            choice = min(timings, key=timings.__getitem__)
            packed.choice[bucket] = choice
        return choice

    def encode(self, x: torch.Tensor, act: ActivationSpec, group: GemmGroup,
               packed: Any = None) -> tuple[torch.Tensor, float | torch.Tensor]:
        kind = self._choose(packed, x, act, group) if packed is not None else "onednn"
        return encode_rows(x, act, group.act_scale, group.smooth, unsigned=kind == "onednn")

    def gemm(self, packed: Any, group: GemmGroup, codes: torch.Tensor, row_scale: torch.Tensor | float,
             bias: torch.Tensor | None) -> torch.Tensor:
        return self._gemm(packed, group, codes, row_scale, bias)

    @staticmethod
    def _gemm(packed: CpuPacked, group: GemmGroup, codes: torch.Tensor, row_scale: torch.Tensor | float,
              bias: torch.Tensor | None) -> torch.Tensor:
        scalar = isinstance(row_scale, float)
        if codes.dtype == torch.uint8:  # oneDNN: codes were shifted by +128 in encode()
            y = torch.ops.onednn.qlinear_pointwise(
                codes, row_scale if scalar else 1.0, 128, packed.onednn, group.w_scale, packed.zero_points, bias,
                1.0, 0, torch.float32, "none", [], "")
            return y if scalar else y.mul_(row_scale)
        y = torch._int_mm(codes, packed.w_t).float().mul_(group.w_scale)
        y = y.mul_(row_scale)
        return y.add_(bias) if bias is not None else y
