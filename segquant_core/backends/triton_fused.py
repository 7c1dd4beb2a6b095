"""Fused W8A8 SegLinear kernel in Triton: quantize → int8 GEMM → per-segment scales → dequantize, one kernel.

What the unfused path does in several passes happens inside one tile loop here:

* activations are quantized on the fly from the float input (``round(x · mul_k)`` with ``mul_k`` folding
  the SmoothQuant divisor and the activation step of the K-group the column belongs to), so the int8
  activation tensor never exists in memory;
* **in-segments** (per-head / concatenated inputs) are *K-groups*: each K tile belongs to one group, whose
  int32 partial product is promoted to fp32 and scaled by ``s_x[group] · s_w[group, n]`` inside the main
  loop (as block-scaled fp8 GEMMs do). With a single group, the int32 accumulator is scaled once at the end;
* **out-segments** fold into the per-column weight-scale vector (one launch per group of segments that share
  their quantized input — see :mod:`.grouping`);
* **DualScale** keeps two int32 accumulators: every X and W tile is loaded once and feeds both the
  positive-code and the negative-code dot products; the epilogue adds them with their own scales.
  When only some in-segments are dual, the others run in the same launch with equal positive and negative
  steps, which splits their codes by sign without changing them.

Rounding is half-to-even, written with floor so that it runs identically on the GPU and in Triton's CPU
interpreter (``TRITON_INTERPRET=1``), where the tests run it. Only static (calibrated) activation scales
are fused; dynamic per-token layers go to the ``int-mm`` backend.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from segquant_core.backends.base import Backend
from segquant_core.backends.grouping import GemmGroup, plan_gemms

if TYPE_CHECKING:
    from segquant_core.seglinear import SegLinear

try:  # Triton is optional: the engine imports and runs without it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None
    tl = None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


if triton is not None:

    @triton.jit
    def _round_half_even(v):
        r = tl.floor(v + 0.5)
        tie = (r - v) == 0.5
        odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
        return tl.where(tie & odd, r - 1.0, r)

    @triton.jit
    def _seg_w8a8_kernel(
        x_ptr,
        w_ptr,
        y_ptr,
        bias_ptr,
        mul_p_ptr,
        mul_n_ptr,
        tile_group_ptr,
        tile_sp_ptr,
        tile_sn_ptr,
        wscale_ptr,
        M,
        N,
        K,
        stride_xm,
        stride_xk,
        stride_wn,
        stride_wk,
        stride_ym,
        stride_yn,
        stride_sg,
        DUAL: tl.constexpr,
        SINGLE_GROUP: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        m_ok = rm < M
        n_ok = rn < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_pi = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        acc_ni = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for kt in range(0, tl.cdiv(K, BLOCK_K)):
            k = kt * BLOCK_K + rk
            k_ok = k < K
            x = tl.load(
                x_ptr + rm[:, None] * stride_xm + k[None, :] * stride_xk, mask=m_ok[:, None] & k_ok[None, :], other=0.0
            ).to(tl.float32)
            w = tl.load(
                w_ptr + k[:, None] * stride_wk + rn[None, :] * stride_wn, mask=k_ok[:, None] & n_ok[None, :], other=0
            )
            mul_p = tl.load(mul_p_ptr + k, mask=k_ok, other=0.0)
            if DUAL:
                mul_n = tl.load(mul_n_ptr + k, mask=k_ok, other=0.0)
                qp = tl.minimum(tl.maximum(_round_half_even(tl.maximum(x, 0.0) * mul_p[None, :]), 0.0), 127.0)
                qn = tl.minimum(tl.maximum(_round_half_even(tl.minimum(x, 0.0) * mul_n[None, :]), -128.0), 0.0)
                dp = tl.dot(qp.to(tl.int8), w, out_dtype=tl.int32)
                dn = tl.dot(qn.to(tl.int8), w, out_dtype=tl.int32)
            else:
                q = tl.minimum(tl.maximum(_round_half_even(x * mul_p[None, :]), -128.0), 127.0)
                dp = tl.dot(q.to(tl.int8), w, out_dtype=tl.int32)
                dn = dp  # unused
            if SINGLE_GROUP:
                acc_pi += dp
                if DUAL:
                    acc_ni += dn
            else:
                g = tl.load(tile_group_ptr + kt)
                ws = tl.load(wscale_ptr + g * stride_sg + rn, mask=n_ok, other=0.0)
                sp = tl.load(tile_sp_ptr + kt)
                acc += dp.to(tl.float32) * (sp * ws)[None, :]
                if DUAL:
                    sn = tl.load(tile_sn_ptr + kt)
                    acc += dn.to(tl.float32) * (sn * ws)[None, :]
        if SINGLE_GROUP:
            ws = tl.load(wscale_ptr + rn, mask=n_ok, other=0.0)
            sp = tl.load(tile_sp_ptr)
            acc = acc_pi.to(tl.float32) * (sp * ws)[None, :]
            if DUAL:
                sn = tl.load(tile_sn_ptr)
                acc += acc_ni.to(tl.float32) * (sn * ws)[None, :]
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0)[None, :]
        tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :] * stride_yn, acc, mask=m_ok[:, None] & n_ok[None, :])


@dataclass
class _Launch:
    """One kernel launch: a K-grouped GEMM over input columns ``in_cols`` into output columns ``out_cols``."""

    in_cols: tuple[int, int]
    out_cols: tuple[int, int]
    w: torch.Tensor  # int8 [N_g, K_g]
    mul_p: torch.Tensor  # fp32 [K_g]
    mul_n: torch.Tensor
    tile_group: torch.Tensor  # int32 [K_g / BLOCK_K]
    tile_sp: torch.Tensor  # fp32 [K_g / BLOCK_K]
    tile_sn: torch.Tensor
    wscale: torch.Tensor  # fp32 [G, N_g]
    single_group: bool
    block_k: int
    lowrank: list[tuple[tuple[int, int], torch.Tensor | None, torch.Tensor, torch.Tensor]]


def _block_k(sizes: list[int]) -> int | None:
    for b in (128, 64, 32, 16):
        if all(s % b == 0 for s in sizes):
            return b
    return None


class TritonFusedBackend(Backend):
    name = "triton-fused"
    block_m = 64
    block_n = 64

    @classmethod
    def available(cls) -> bool:
        return triton is not None and (torch.cuda.is_available() or interpreting())

    def unsupported_reason(self, layer: SegLinear) -> str | None:
        cfg = layer.cfg
        if not self.available():
            return "Triton is not installed or there is no CUDA device (set TRITON_INTERPRET=1 to emulate)"
        device = layer.device.type
        if device != "cuda" and not interpreting():
            return "layer is not on a CUDA device"
        if cfg.weight is None or not cfg.weight.fmt.is_int:
            return "weights are not int8/int4"
        act = cfg.activation
        if act is None or act.fmt.value != "int8" or act.dynamic:
            return "the fused kernel takes int8 activations with static (calibrated) scales"
        sizes = list(cfg.segments.sizes) if cfg.segments.axis == "in" else [cfg.in_features]
        if _block_k(sizes) is None:
            return f"input segment sizes {sizes} are not multiples of 16"
        return None

    def prepare(self, layer: SegLinear) -> list[_Launch]:
        cfg = layer.cfg
        assert cfg.activation is not None
        device = layer.device
        groups = plan_gemms(layer)
        launches: list[_Launch] = []

        def act_steps(g: GemmGroup) -> tuple[float, float]:
            """Positive and negative steps; a single-scale group uses its one step for both signs."""
            assert g.act_scale is not None and g.act is not None
            s = g.act_scale.float().reshape(-1)
            return float(s[0]), float(s[1]) if g.act.dual else float(s[0])

        def lowrank_of(g: GemmGroup, cols: tuple[int, int]):
            if g.lowrank is None:
                return []
            return [(cols, g.smooth, g.lowrank[0].float(), g.lowrank[1].float())]

        if cfg.segments.axis == "in":
            sizes = list(cfg.segments.sizes)
            bk = _block_k(sizes)
            assert bk is not None
            mul_p, mul_n, tg, tsp, tsn, wscales, lowranks = [], [], [], [], [], [], []
            for gi, g in enumerate(groups):
                sp, sn = act_steps(g)
                k = g.codes.shape[1]
                smooth = g.smooth.float() if g.smooth is not None else torch.ones(k, device=device)
                mul_p.append(1.0 / (smooth * sp))
                mul_n.append(1.0 / (smooth * sn))
                tiles = k // bk
                tg += [gi] * tiles
                tsp += [sp] * tiles
                tsn += [sn] * tiles
                wscales.append(g.w_scale.float())
                assert g.in_slice is not None
                lowranks += lowrank_of(g, g.in_slice)
            w = torch.cat([g.codes for g in groups], dim=1).contiguous()
            launches.append(
                _Launch(
                    (0, cfg.in_features),
                    (0, cfg.out_features),
                    w,
                    torch.cat(mul_p).contiguous(),
                    torch.cat(mul_n).contiguous(),
                    torch.tensor(tg, dtype=torch.int32, device=device),
                    torch.tensor(tsp, dtype=torch.float32, device=device),
                    torch.tensor(tsn, dtype=torch.float32, device=device),
                    torch.stack(wscales).contiguous(),
                    len(groups) == 1,
                    bk,
                    lowranks,
                )
            )
            return launches
        bk = _block_k([cfg.in_features])
        assert bk is not None
        for g in groups:
            sp, sn = act_steps(g)
            k = g.codes.shape[1]
            smooth = g.smooth.float() if g.smooth is not None else torch.ones(k, device=device)
            out_cols = g.out_slice or (0, cfg.out_features)
            tiles = k // bk
            launches.append(
                _Launch(
                    (0, k),
                    out_cols,
                    g.codes.contiguous(),
                    (1.0 / (smooth * sp)).contiguous(),
                    (1.0 / (smooth * sn)).contiguous(),
                    torch.zeros(tiles, dtype=torch.int32, device=device),
                    torch.full((tiles,), sp, device=device),
                    torch.full((tiles,), sn, device=device),
                    g.w_scale.float().reshape(1, -1).contiguous(),
                    True,
                    bk,
                    lowrank_of(g, (0, k)),
                )
            )
        return launches

    def run(self, layer: SegLinear, state: list[_Launch], x: torch.Tensor) -> torch.Tensor:
        act = layer.cfg.activation
        assert act is not None
        if interpreting() and x.dtype == torch.bfloat16:
            x = x.float()  # the interpreter cannot do bf16 arithmetic
        m = x.shape[0]
        y = torch.empty(m, layer.out_features, dtype=torch.float32, device=x.device)
        bias = layer.bias.float() if layer.bias is not None else None
        first_out = True
        for launch in state:
            a, b = launch.out_cols
            n = b - a
            # In-segment layers are one launch covering all columns; out-groups write disjoint column slices.
            target = y[:, a:b]
            grid = (triton.cdiv(m, self.block_m), triton.cdiv(n, self.block_n))
            with_bias = bias is not None and (len(state) > 1 or first_out)
            _seg_w8a8_kernel[grid](
                x,
                launch.w,
                target,
                bias[a:b] if with_bias else y,
                launch.mul_p,
                launch.mul_n,
                launch.tile_group,
                launch.tile_sp,
                launch.tile_sn,
                launch.wscale,
                m,
                n,
                launch.w.shape[1],
                x.stride(0),
                x.stride(1),
                launch.w.stride(0),
                launch.w.stride(1),
                target.stride(0),
                target.stride(1),
                launch.wscale.stride(0),
                DUAL=act.dual,
                SINGLE_GROUP=launch.single_group,
                HAS_BIAS=with_bias,
                BLOCK_M=self.block_m,
                BLOCK_N=self.block_n,
                BLOCK_K=launch.block_k,
            )
            first_out = False
            for (ka, kb), smooth, down, up in launch.lowrank:
                xs = x[:, ka:kb].float()
                if smooth is not None:
                    xs = xs / smooth
                target += (xs @ down) @ up
        return y


def reference_int_gemm(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Exact int32 product ``a · wᵀ`` of int8 codes (the oracle for kernel tests)."""
    return a.to(torch.int32) @ w.to(torch.int32).t()


__all__: list[Any] = ["TritonFusedBackend", "interpreting", "reference_int_gemm"]
