"""CPU int8 backend: three integer GEMM kernels, picked per call by a deterministic shape rule.

- **oneDNN** prepacked quantized linear: our symmetric int8 codes are shifted by 128 into uint8 (zero point
  128, exact), because oneDNN runs its fast u8×s8 VNNI kernels only for unsigned activations (the same op
  with signed activations falls back to a loop ~1000× slower). Per-output-column weight scales, the
  activation scale and the bias are applied in the same call. The default for M > 32.
- ``torch._int_mm`` (s8×s8 → s32, then a scaling pass): used only when forced or by autotune. An earlier
  rule sent K ≥ 4096 and M ≥ 2048 here (ENVIRONMENT.md); side-by-side runs with the fused epilogues
  (docs/benchmarks.md) found oneDNN as fast or faster at every SD3.5 shape, and much faster for DualScale.
- **fbgemm** (``quantized::linear_with_input_q_dq_qweight_dq_output_fp32``) for small M, e.g. the AdaLN
  modulation (M = batch): its kernel has far less per-call overhead than oneDNN's there (0.3 ms vs 0.5 ms at
  4×1536×9216). A static single-scale layer is one call that quantizes, multiplies and adds the bias;
  other inputs (DualScale, per-token) are fed our codes as floats with scale 1 and zero point 128, which it
  requantizes exactly. Its packed weight is made lazily, only for groups that see a small M, so large
  layers do not carry a second copy.

The rule is deterministic, so the same artifact gives bit-identical outputs in every process.
``SEGQUANT_CPU_GEMM=autotune`` instead times the kernels once per power-of-two bucket of M on the real
input and keeps the fastest (the choice, and so the last bits, can then differ between runs); ``onednn``,
``int_mm`` or ``fbgemm`` forces one. int4 weights are unpacked to int8 for the GEMM (no faster CPU int4
path at these shapes).
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from segquant_core.backends.folding import fold_in_segments, folding_requested
from segquant_core.backends.fused_quant import encode_channels, encode_rows
from segquant_core.backends.grouped import GroupedGemmBackend, PreparedGroup, PreparedLayer
from segquant_core.backends.grouping import GemmGroup
from segquant_core.quantizers import ActivationSpec

if TYPE_CHECKING:
    from segquant_core.seglinear import SegLinear


@dataclass
class CpuPacked:
    """A group's weight for the CPU kernels, and which one won per power-of-two bucket of M.

    The oneDNN prepack is the weight's one resident copy: the unpacked codes are dropped after packing
    and re-derived from it (:func:`onednn_codes`) for the kernels that are packed later, on first use.
    """

    onednn: torch.Tensor  # prepacked oneDNN weight
    n: int
    k: int
    zero_points: torch.Tensor
    choice: dict[int, str] = field(default_factory=dict)
    act_scales: tuple[float, ...] = ()  # static activation scale(s) as Python floats, for the fused calls
    w_t: torch.Tensor | None = None  # int8 [K, N] for torch._int_mm, made on first use (forced or autotuned)
    fbgemm: Any = None  # fbgemm packed weight (with the column scales), made on first small-M call
    fbgemm_static: Any = None  # ... with the bias too, for the one-call static single-scale path


# Row block when re-deriving codes from a oneDNN prepack (an identity GEMM): bounds its temporaries.
UNPACK_ROWS = 512


def onednn_codes(packed: CpuPacked) -> torch.Tensor:
    """The int8 codes ``[N, K]`` a oneDNN prepack holds, recovered exactly.

    oneDNN offers no unpack for its blocked layout, so the prepack multiplies the identity: activation
    codes ``128 + e_j`` (zero point 128) with unit scales give ``W[:, j]`` as small integers in fp32,
    which convert back exactly. Costs one ``K × K × N`` integer GEMM; used for save, export and the
    lazily packed kernels, never per call.
    """
    n, k = packed.n, packed.k
    ones = torch.ones(n)
    out = torch.empty(n, k, dtype=torch.int8)
    for r0 in range(0, k, UNPACK_ROWS):
        r1 = min(k, r0 + UNPACK_ROWS)
        eye = torch.full((r1 - r0, k), 128, dtype=torch.uint8)
        eye[torch.arange(r1 - r0), torch.arange(r0, r1)] = 129
        y = torch.ops.onednn.qlinear_pointwise(
            eye, 1.0, 128, packed.onednn, ones, packed.zero_points, None, 1.0, 0, torch.float32, "none", [], ""
        )
        out[:, r0:r1] = y.t().round().to(torch.int8)
    return out


def _codes(packed: CpuPacked, group: GemmGroup) -> torch.Tensor:
    return group.codes if group.codes is not None else onednn_codes(packed)


def fbgemm_packed_bytes(n: int, k: int, bias: bool) -> int:
    """fbgemm's packed per-channel int8 weight: codes, fp64 scales, int64 zero points (+ fp32 bias).
    Counted from that layout: the packed object does not report its size."""
    return n * k + 16 * n + (4 * n if bias else 0)


# Rows of x (before DualScale stacking) up to which the fbgemm kernel is used. Measured on the 2-core
# AVX-512 VNNI machine: fbgemm wins clearly at M ≤ 16 and loses to oneDNN from M ≈ 64 on.
SMALL_M = 32
# Row block of the in-segment path: its fp32 output block (6 MB at N = 1536) is re-read by every segment.
IN_SEGMENT_ROWS = 1024
_FBGEMM_OP = "linear_with_input_q_dq_qweight_dq_output_fp32"


def fbgemm_available() -> bool:
    # torch has deprecated quantized tensors (which packing needs); without them the rule falls back to oneDNN.
    return (
        "fbgemm" in torch.backends.quantized.supported_engines
        and hasattr(torch.ops.quantized, _FBGEMM_OP)
        and hasattr(torch, "_make_per_channel_quantized_tensor")
    )


def _fbgemm_pack(packed: CpuPacked, group: GemmGroup, bias: torch.Tensor | None = None) -> Any:
    """Per-channel qint8 weight (codes + column scales, optionally the bias) prepacked for fbgemm."""
    n = packed.n
    codes = _codes(packed, group)
    with warnings.catch_warnings():  # quantized tensors are deprecated in torch but still the way to pack
        warnings.simplefilter("ignore")
        qw = torch._make_per_channel_quantized_tensor(
            codes.contiguous(), group.w_scale.double(), torch.zeros(n, dtype=torch.long), 0
        )
        return torch.ops.quantized.linear_prepack(qw, bias)


def _fbgemm(x: torch.Tensor, packed: Any, scale: float = 1.0) -> torch.Tensor:
    """fp32 ``Q(x / scale) · Wᵀ ⊙ scale ⊙ w_scale (+ packed bias)``; with scale 1 and integer-valued
    x (our codes) the requantization is exact."""
    return getattr(torch.ops.quantized, _FBGEMM_OP)(x, scale, 128, packed)


@dataclass
class CpuPreparedLayer(PreparedLayer):
    # in-segments with static single scales: per-input-channel (smoothing, activation scale) for one encode pass
    channels: tuple[torch.Tensor, torch.Tensor] | None = None
    # opt-in (SEGQUANT_CPU_IN_SEGMENTS=folded): the same in-segments as one GEMM, see backends/folding.py
    folded: CpuPacked | None = None
    folded_scale: torch.Tensor | None = None


class OneDNNInt8Backend(GroupedGemmBackend):
    name = "cpu-onednn-int8"  # (name kept for artifacts/tests; it picks oneDNN or _int_mm per shape)

    @classmethod
    def available(cls) -> bool:
        return (
            torch.backends.mkldnn.is_available()
            and hasattr(torch.ops, "onednn")
            and hasattr(torch.ops.onednn, "qlinear_prepack")
        )

    def unsupported_reason(self, layer: SegLinear) -> str | None:
        cfg = layer.cfg
        if not self.available():
            return "oneDNN quantized linear ops are not in this torch build"
        if layer.device.type != "cpu":
            return "layer is not on the CPU"
        if cfg.weight is None or not cfg.weight.fmt.is_int:
            return "weights are not int8/int4"
        if cfg.activation is None or cfg.activation.fmt.value != "int8":
            return "activations are not int8"
        return None

    def pack(self, group: GemmGroup) -> CpuPacked:
        assert group.codes is not None
        codes = group.codes.contiguous()
        n, k = codes.shape
        zps = torch.zeros(n, dtype=torch.int64)
        scales = tuple(group.act_scale.float().reshape(-1).tolist()) if group.act_scale is not None else ()
        return CpuPacked(torch.ops.onednn.qlinear_prepack(codes, None), n, k, zps, act_scales=scales)

    def unpack(self, packed: Any, group: GemmGroup) -> torch.Tensor | None:
        return onednn_codes(packed)

    def packed_bytes(self, packed: Any, seen: set[int]) -> int:
        from segquant_core.seglinear import tensor_bytes_once

        p: CpuPacked = packed
        total = p.n * p.k + tensor_bytes_once(p.zero_points, seen)  # the prepack: one int8 per weight
        if p.w_t is not None:
            total += tensor_bytes_once(p.w_t, seen)
        if p.fbgemm is not None:
            total += fbgemm_packed_bytes(p.n, p.k, bias=False)
        if p.fbgemm_static is not None:
            total += fbgemm_packed_bytes(p.n, p.k, bias=True)
        return total

    def _choose(self, packed: CpuPacked, x: torch.Tensor, act: ActivationSpec, group: GemmGroup) -> str:
        mode = os.environ.get("SEGQUANT_CPU_GEMM", "rule")
        if mode == "fbgemm" and not fbgemm_available():
            raise RuntimeError("SEGQUANT_CPU_GEMM=fbgemm, but this torch build has no fbgemm quantized linear")
        if mode in ("onednn", "int_mm", "fbgemm"):
            return mode
        if mode != "autotune":
            return "fbgemm" if x.shape[0] <= SMALL_M and fbgemm_available() else "onednn"
        bucket = max(1, x.shape[0]).bit_length()
        choice = packed.choice.get(bucket)
        if choice is None:
            timings = {}
            for kind in ("onednn", "int_mm", "fbgemm") if fbgemm_available() else ("onednn", "int_mm"):
                rows, scale = self._encode_for(kind, x, act, group)
                best = float("inf")
                for _ in range(2):
                    t0 = time.perf_counter()
                    self._gemm(packed, group, rows, scale, None)
                    best = min(best, time.perf_counter() - t0)
                timings[kind] = best
            choice = min(timings, key=timings.__getitem__)
            packed.choice[bucket] = choice
        return choice

    def prepare(self, layer: SegLinear) -> CpuPreparedLayer:
        base = super().prepare(layer)
        act = layer.cfg.activation
        channels = None
        if (
            layer.cfg.segments.axis == "in"
            and len(base.groups) > 1
            and act is not None
            and not act.dynamic
            and not act.dual
            and all(pg.group.act_scale is not None for pg in base.groups)
        ):
            scales, smooth = [], []
            for pg in base.groups:
                g = pg.group
                assert g.in_slice is not None and g.act_scale is not None
                width = g.in_slice[1] - g.in_slice[0]
                scales.append(g.act_scale.float().reshape(-1)[:1].expand(width))
                smooth.append(g.smooth.float() if g.smooth is not None else torch.ones(width))
            channels = (torch.cat(smooth), torch.cat(scales))
        state = CpuPreparedLayer(base.groups, base.bias, base.fuse_bias, channels)
        if channels is not None and folding_requested():
            codes, state.folded_scale = fold_in_segments(
                [(self.group_codes(pg), pg.group.w_scale, pg.packed.act_scales[0]) for pg in base.groups]
            )
            n, k = codes.shape
            state.folded = CpuPacked(
                torch.ops.onednn.qlinear_prepack(codes, None), n, k, torch.zeros(n, dtype=torch.int64)
            )
        return state

    def state_bytes(self, state: Any, seen: set[int]) -> int:
        total = super().state_bytes(state, seen)
        if isinstance(state, CpuPreparedLayer) and state.folded is not None:
            total += self.packed_bytes(state.folded, seen) + 4 * state.folded.n
        return total

    def run(self, layer: SegLinear, state: PreparedLayer, x: torch.Tensor) -> torch.Tensor:
        """Static-scale layers on oneDNN take fused paths (below); everything else the generic group loop."""
        act = layer.cfg.activation
        assert act is not None
        groups = state.groups
        if act.dynamic or any(pg.group.lowrank is not None for pg in groups):
            return super().run(layer, state, x)
        if isinstance(state, CpuPreparedLayer) and state.folded is not None and state.channels is not None:
            return self._folded_in_segments(state, state.channels, x)
        first = groups[0].group  # the kernel is chosen on the first group's own input and quantizer
        x_first = x if first.in_slice is None else x[:, first.in_slice[0] : first.in_slice[1]]
        kind = self._choose(groups[0].packed, x_first, first.act or act, first)
        if kind == "fbgemm" and len(groups) == 1:
            if act.dual:
                return self._fbgemm_dual_static(groups[0], x, act, state.bias)
            return self._fbgemm_static(groups[0], x, state.bias)
        if kind != "onednn":
            return super().run(layer, state, x)
        if len(groups) == 1:
            out_dtype = x.dtype if x.dtype == torch.bfloat16 else torch.float32
            return self._one_group(groups[0], x, act, state.bias, out_dtype)
        channels = state.channels if isinstance(state, CpuPreparedLayer) else None
        if channels is not None:
            return self._in_segments(state, channels, x)
        return super().run(layer, state, x)

    @staticmethod
    def _fbgemm_static(pg: PreparedGroup, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """Small M, one static scale: a single fbgemm call quantizes, multiplies and adds the bias.

        At M = 2 the whole layer costs ~0.3 ms, so the ~8 small ops and Python layers of the generic path
        (~50 µs) matter. fbgemm rounds ``x · (1/scale)`` where our encoder rounds ``x / scale``, so a code
        can differ by one where the two straddle a rounding boundary; the choice of path is deterministic.
        """
        p, g = pg.packed, pg.group
        if p.fbgemm_static is None:
            p.fbgemm_static = _fbgemm_pack(p, g, bias)
        xs = x.float() if g.smooth is None else x.float() / g.smooth
        return _fbgemm(xs, p.fbgemm_static, p.act_scales[0])

    @staticmethod
    def _fbgemm_dual_static(
        pg: PreparedGroup, x: torch.Tensor, act: ActivationSpec, bias: torch.Tensor | None
    ) -> torch.Tensor:
        """Small M, static DualScale: both halves' codes in one fbgemm call (the weight is streamed once),
        then ``y⁺·s⁺ + y⁻·s⁻ (+ bias)`` over M rows only."""
        p, g = pg.packed, pg.group
        if p.fbgemm is None:
            p.fbgemm = _fbgemm_pack(p, g)
        sp, sn = p.act_scales[:2]
        m = x.shape[0]
        codes, _ = encode_rows(x, act, g.act_scale, g.smooth, unsigned=False, as_float=True)
        y = _fbgemm(codes, p.fbgemm)
        out = y[:m].mul_(sp).add_(y[m:], alpha=sn)
        return out.add_(bias) if bias is not None else out

    @staticmethod
    def _one_group(
        pg: PreparedGroup, x: torch.Tensor, act: ActivationSpec, bias: torch.Tensor | None, out_dtype: torch.dtype
    ) -> torch.Tensor:
        """The whole layer in one fused call, or two for static DualScale; output straight in ``out_dtype``.

        DualScale: the positive half's call applies its scale and the bias, the negative half's call its
        own scale and adds the first result as a post-op. The generic path instead writes a ``[2M, N]``
        fp32 product and makes three more passes over it (row scales, halves, bias), which cost as much
        as a third GEMM at M = 1024.
        """
        rows, _ = encode_rows(x, act, pg.group.act_scale, pg.group.smooth, unsigned=True)
        return OneDNNInt8Backend._one_group_codes(pg, rows, x.shape[0], act.dual, bias, out_dtype)

    @staticmethod
    def _one_group_codes(
        pg: PreparedGroup, rows: torch.Tensor, m: int, dual: bool, bias: torch.Tensor | None, out_dtype: torch.dtype
    ) -> torch.Tensor:
        """:meth:`_one_group` after the encode (uint8 codes ``[M, K]``, or ``[2M, K]`` for DualScale); a
        compiled denoiser quantizes in its graph and calls this through ``segquant::cpu_onednn_int8_gemm``."""
        p, g = pg.packed, pg.group
        scales = p.act_scales
        if not dual:
            return torch.ops.onednn.qlinear_pointwise(
                rows, scales[0], 128, p.onednn, g.w_scale, p.zero_points, bias, 1.0, 0, out_dtype, "none", [], ""
            )
        y = torch.ops.onednn.qlinear_pointwise(
            rows[:m], scales[0], 128, p.onednn, g.w_scale, p.zero_points, bias, 1.0, 0, torch.float32, "none", [], ""
        )
        return torch.ops.onednn.qlinear_pointwise.binary(
            rows[m:],
            scales[1],
            128,
            p.onednn,
            g.w_scale,
            p.zero_points,
            y,
            None,
            1.0,
            0,
            out_dtype,
            1.0,
            0,
            "sum" if out_dtype == torch.float32 else "add",
            1.0,
            "none",
            [],
            "",
        )

    @staticmethod
    def _folded_in_segments(
        state: CpuPreparedLayer, channels: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor
    ) -> torch.Tensor:
        """Opt-in folded in-segments: the per-channel encode, then one oneDNN call over the full K whose
        per-column scales are the folded ones (activation scale 1), bias included, output in bf16 for bf16."""
        assert state.folded is not None
        p = state.folded
        codes = encode_channels(x, channels[0], channels[1], unsigned=True)
        out_dtype = x.dtype if x.dtype == torch.bfloat16 else torch.float32
        return torch.ops.onednn.qlinear_pointwise(
            codes, 1.0, 128, p.onednn, state.folded_scale, p.zero_points, state.bias, 1.0, 0, out_dtype, "none", [], ""
        )

    @staticmethod
    def _in_segments(
        state: PreparedLayer, channels: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor
    ) -> torch.Tensor:
        """In-segments (per-head scales): one encode pass for all segments, then one call per segment that
        accumulates into the output in place (``sum`` post-op) instead of writing and adding a product each.

        Each call re-reads and re-writes the ``[M, N]`` fp32 output, so rows go in blocks of
        ``IN_SEGMENT_ROWS`` whose output stays in cache across the segments (59 → 41 ms at 4096×1536×1536
        with 24 heads).
        """
        codes = encode_channels(x, channels[0], channels[1], unsigned=True)
        blocks = []
        for r0 in range(0, x.shape[0], IN_SEGMENT_ROWS):
            rows = codes[r0 : r0 + IN_SEGMENT_ROWS]
            y: torch.Tensor | None = None
            for pg in state.groups:
                p, g = pg.packed, pg.group
                assert g.in_slice is not None
                xk = rows[:, g.in_slice[0] : g.in_slice[1]]
                scale = p.act_scales[0]
                if y is None:
                    y = torch.ops.onednn.qlinear_pointwise(
                        xk,
                        scale,
                        128,
                        p.onednn,
                        g.w_scale,
                        p.zero_points,
                        state.bias,
                        1.0,
                        0,
                        torch.float32,
                        "none",
                        [],
                        "",
                    )
                else:
                    torch.ops.onednn.qlinear_pointwise.binary(
                        xk,
                        scale,
                        128,
                        p.onednn,
                        g.w_scale,
                        p.zero_points,
                        y,
                        None,
                        1.0,
                        0,
                        torch.float32,
                        1.0,
                        0,
                        "sum",
                        1.0,
                        "none",
                        [],
                        "",
                    )
            assert y is not None
            blocks.append(y)
        return blocks[0] if len(blocks) == 1 else torch.cat(blocks)

    def encode(
        self, x: torch.Tensor, act: ActivationSpec, group: GemmGroup, packed: Any = None
    ) -> tuple[torch.Tensor, float | torch.Tensor]:
        kind = self._choose(packed, x, act, group) if packed is not None else "onednn"
        return self._encode_for(kind, x, act, group)

    @staticmethod
    def _encode_for(
        kind: str, x: torch.Tensor, act: ActivationSpec, group: GemmGroup
    ) -> tuple[torch.Tensor, float | torch.Tensor]:
        """Codes in the form each kernel takes: uint8 (+128) for oneDNN, int8 for _int_mm, fp32 for fbgemm."""
        return encode_rows(x, act, group.act_scale, group.smooth, unsigned=kind == "onednn", as_float=kind == "fbgemm")

    def gemm(
        self,
        packed: Any,
        group: GemmGroup,
        codes: torch.Tensor,
        row_scale: torch.Tensor | float,
        bias: torch.Tensor | None,
    ) -> torch.Tensor:
        return self._gemm(packed, group, codes, row_scale, bias)

    @staticmethod
    def _gemm(
        packed: CpuPacked,
        group: GemmGroup,
        codes: torch.Tensor,
        row_scale: torch.Tensor | float,
        bias: torch.Tensor | None,
    ) -> torch.Tensor:
        scalar = isinstance(row_scale, float)
        if codes.dtype == torch.float32:  # fbgemm: exact integer codes as floats, requantized with scale 1
            if packed.fbgemm is None:
                packed.fbgemm = _fbgemm_pack(packed, group)
            y = _fbgemm(codes, packed.fbgemm).mul_(row_scale)
            return y.add_(bias) if bias is not None else y
        if codes.dtype == torch.uint8:  # oneDNN: codes were shifted by +128 in encode()
            y = torch.ops.onednn.qlinear_pointwise(
                codes,
                row_scale if scalar else 1.0,
                128,
                packed.onednn,
                group.w_scale,
                packed.zero_points,
                bias,
                1.0,
                0,
                torch.float32,
                "none",
                [],
                "",
            )
            return y if scalar else y.mul_(row_scale)
        if packed.w_t is None:
            packed.w_t = _codes(packed, group).t()
        y = torch._int_mm(codes, packed.w_t).float().mul_(group.w_scale)
        y = y.mul_(row_scale)
        return y.add_(bias) if bias is not None else y
