"""SegLinear's kernels as torch custom ops (namespace ``segquant``), so a quantized denoiser compiles whole.

Under ``torch.compile`` a SegLinear does not trace its backend's Python (prepacked oneDNN weights are opaque
tensors Dynamo cannot fake, fbgemm packs are script objects, the kernel choice reads the environment).
Instead each layer becomes one call of an opaque op per backend, ``segquant::<backend>_linear(x, handle, N)``,
whose fake implementation only states the output shape. Inside the op the layer's backend runs exactly as in
eager mode, so compiled and eager outputs are the same bits; the graph around it (norms, modulation,
attention, GELU, LoRA branches) is Inductor's to fuse.

Prepacked weights stay where the backend keeps them. The op reaches its layer through an integer *handle*
(a constant in the graph) that :func:`bind` registers: an int is something every compiler stage accepts and
that Inductor's FX graph cache can key on, so a restarted worker that binds its layers in the same order
hits the cache. The registry holds layers weakly.
"""

from __future__ import annotations

import itertools
import os
import weakref
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

import torch

from segquant_core.quantizers import Granularity

if TYPE_CHECKING:
    from segquant_core.seglinear import SegLinear

NAMESPACE = "segquant"
BACKEND_NAMES = ("cpu-onednn-int8", "int-mm", "scaled-mm-fp8", "triton-fused", "reference")

_LAYERS: dict[int, weakref.ref[SegLinear]] = {}
_HANDLES = itertools.count(1)


def _live(handle: int) -> SegLinear | None:
    ref = _LAYERS.get(handle)
    return ref() if ref is not None else None


def _forget(ref: weakref.ref[SegLinear], handle: int) -> None:
    if _LAYERS.get(handle) is ref:
        del _LAYERS[handle]


def bind(layer: SegLinear, handle: int | None = None) -> int:
    """Register ``layer`` under ``handle`` (default: a fresh one) for its op to resolve at run time.

    A handle held by another live layer is never shared: the layer then gets a fresh one. Re-binding (each
    :meth:`SegLinear.set_backend` does) means a copied layer never runs its original's kernels.
    """
    if handle is None or _live(handle) not in (None, layer):
        handle = next(_HANDLES)
        while _live(handle) is not None:
            handle = next(_HANDLES)
    old = layer.__dict__.get("kernel_handle")
    if old is not None and old != handle and _live(old) is layer:
        del _LAYERS[old]
    _LAYERS[handle] = weakref.ref(layer, partial(_forget, handle=handle))
    layer.__dict__["kernel_handle"] = handle
    return handle


def bound_layer(handle: int) -> SegLinear:
    ref = _LAYERS.get(handle)
    layer = ref() if ref is not None else None
    if layer is None:
        raise RuntimeError(f"segquant op: no live SegLinear is bound to handle {handle}")
    return layer


def op_name(backend: str) -> str:
    """``cpu-onednn-int8`` → ``cpu_onednn_int8_linear`` (the op's name inside the ``segquant`` namespace)."""
    return backend.replace("-", "_") + "_linear"


def _run(x: torch.Tensor, handle: int, out_features: int) -> torch.Tensor:
    layer = bound_layer(handle)
    y = layer.backend.run(layer, layer._prepared, x)
    return y.to(x.dtype)


def _fake(x: torch.Tensor, handle: int, out_features: int) -> torch.Tensor:
    return x.new_empty((x.shape[0], out_features))


def _register(backend: str) -> Callable[..., torch.Tensor]:
    def linear(x: torch.Tensor, handle: int, out_features: int) -> torch.Tensor:
        return _run(x, handle, out_features)

    linear.__doc__ = f"``y = layer(x)`` for a SegLinear on the {backend} backend (``x [M, K]``, output in x's dtype)."
    op = torch.library.custom_op(f"{NAMESPACE}::{op_name(backend)}", linear, mutates_args=())
    op.register_fake(_fake)
    return op


LINEAR_OPS: dict[str, Callable[..., torch.Tensor]] = {name: _register(name) for name in BACKEND_NAMES}


def linear_op(backend: str) -> Callable[..., torch.Tensor]:
    """The op that runs a layer on ``backend`` (an unknown backend name falls back to the generic one)."""
    op = LINEAR_OPS.get(backend)
    if op is None:
        op = LINEAR_OPS[backend] = _register(backend)
    return op


# --------------------------------------------------------------------------------------------------------
# cpu-onednn-int8, one GEMM group with static scales (most linears of w8a8 and w8a8-segquant): the activation
# quantization stays in the graph as plain torch ops (Inductor fuses it into the norm / modulation / GELU
# that produced x), and only the oneDNN call(s) with their dequantizing epilogue are opaque.


@torch.library.custom_op(f"{NAMESPACE}::cpu_onednn_int8_gemm", mutates_args=())
def onednn_gemm(
    codes: torch.Tensor, handle: int, dual: bool, out_features: int, out_dtype: torch.dtype
) -> torch.Tensor:
    """oneDNN qlinear on uint8 activation codes (+128) of a single-group static layer: ``[M, K]`` codes, or
    ``[2M, K]`` positive-then-negative DualScale codes (two calls, the second adding the first as a post-op),
    per-column weight scales, activation scale(s) and bias applied inside the calls."""
    from segquant_core.backends.cpu_onednn import OneDNNInt8Backend

    layer = bound_layer(handle)
    state = layer._prepared
    m = codes.shape[0] // 2 if dual else codes.shape[0]
    return OneDNNInt8Backend._one_group_codes(state.groups[0], codes, m, dual, state.bias, out_dtype)


@onednn_gemm.register_fake
def _(codes: torch.Tensor, handle: int, dual: bool, out_features: int, out_dtype: torch.dtype) -> torch.Tensor:
    rows = codes.shape[0] // 2 if dual else codes.shape[0]
    return codes.new_empty((rows, out_features), dtype=out_dtype)


@torch.library.custom_op(f"{NAMESPACE}::cpu_onednn_int8_gemm_rows", mutates_args=())
def onednn_gemm_rows(
    codes: torch.Tensor, row_scale: torch.Tensor, handle: int, dual: bool, out_features: int
) -> torch.Tensor:
    """The same for dynamic (per-token or per-tensor) activations: uint8 codes with a per-row scale ``[R, 1]``
    (``R = 2M`` for DualScale), one oneDNN call, then row scales, the DualScale halves and the bias — the
    eager group path after its encode, in fp32."""
    layer = bound_layer(handle)
    state = layer._prepared
    pg = state.groups[0]
    y2 = layer.backend.gemm(pg.packed, pg.group, codes, row_scale, None)  # type: ignore[attr-defined]
    m = codes.shape[0] // 2 if dual else codes.shape[0]
    y = y2[:m].add_(y2[m:]) if dual else y2
    return y.add_(state.bias) if state.bias is not None else y


@onednn_gemm_rows.register_fake
def _(codes: torch.Tensor, row_scale: torch.Tensor, handle: int, dual: bool, out_features: int) -> torch.Tensor:
    rows = codes.shape[0] // 2 if dual else codes.shape[0]
    return codes.new_empty((rows, out_features), dtype=torch.float32)


def _fused_onednn_group(layer: SegLinear, x2d: torch.Tensor) -> torch.Tensor | None:
    """The quantize-in-graph path when eager would run exactly one oneDNN group (static: the fused calls;
    dynamic: the group path with row scales) — same codes, same calls, bit-identical to eager; None where
    eager takes another path (the whole-layer op then runs it)."""
    from segquant_core.backends.cpu_onednn import SMALL_M
    from segquant_core.backends.fused_quant import flavour

    state = layer._prepared
    act = layer.cfg.activation
    if (
        layer.backend.name != "cpu-onednn-int8"
        or act is None
        or len(state.groups) != 1
        or state.groups[0].group.lowrank is not None
        or (not act.dynamic and state.groups[0].group.act_scale is None)
        or os.environ.get("SEGQUANT_CPU_GEMM", "rule") not in ("rule", "onednn")
        or (os.environ.get("SEGQUANT_CPU_GEMM", "rule") == "rule" and x2d.shape[0] <= SMALL_M)
    ):
        return None
    g = state.groups[0].group
    smooth = g.smooth if g.smooth is not None else torch.ones(x2d.shape[-1], device=x2d.device)
    if act.dynamic:
        kind = "token" if act.granularity is Granularity.TOKEN else "tensor"
        codes, row = flavour(f"{kind}_{'dual' if act.dual else 'single'}")(x2d, smooth, torch.uint8)
        return onednn_gemm_rows(codes, row.float(), layer.kernel_handle, act.dual, layer.out_features)
    scales = g.act_scale.float().reshape(-1)
    if act.dual:
        codes = flavour("static_dual")(x2d, smooth, scales[0], scales[1], torch.uint8)
    else:
        codes = flavour("static_single")(x2d, smooth, scales[0], torch.uint8)
    out_dtype = x2d.dtype if x2d.dtype == torch.bfloat16 else torch.float32
    return onednn_gemm(codes, layer.kernel_handle, act.dual, layer.out_features, out_dtype)


def compiled_forward(layer: SegLinear, x: torch.Tensor) -> torch.Tensor:
    """What :meth:`SegLinear.forward` does under ``torch.compile``: activation quantization in the graph and
    the GEMM as one opaque op where that split is exact (:func:`_fused_onednn_group`), else one opaque op
    for the whole layer."""
    handle = getattr(layer, "kernel_handle", None)
    if handle is None:  # set_backend binds every layer that has a backend
        raise RuntimeError("a SegLinear without a backend was compiled; assign one first (sq.assign_backends)")
    x2d = x.reshape(-1, layer.in_features)
    y = _fused_onednn_group(layer, x2d) if FUSE_QUANTIZE else None
    if y is None:
        y = linear_op(layer.backend.name)(x2d, handle, layer.out_features)
    return y.to(x.dtype).reshape(*x.shape[:-1], layer.out_features)


# Switch for measuring what the in-graph quantization buys (docs/benchmarks.md); SEGQUANT_FUSE_QUANTIZE=0
# turns it off at import.
FUSE_QUANTIZE = os.environ.get("SEGQUANT_FUSE_QUANTIZE", "1") not in ("0", "false", "no")
