"""Activation quantization in one pass over ``x``: smoothing, scaling, rounding, clamping, code shift.

Eagerly, quantizing an activation is five or six passes over memory (cast, divide, round, clamp, shift,
cast), which on CPU costs as much as a third of an int8 GEMM at K = 6144 — and DualScale doubles it. Here
each quantizer flavour is one small function compiled by Inductor (``dynamic=True``: compiled once per
flavour, not per shape) into a single vectorised loop that writes the final codes, both halves of a
DualScale input included. The arithmetic is the same as :mod:`segquant_core.quantizers` (divide by the
scale, round half-to-even, clamp), so codes match the reference.

Compilation needs a C++ compiler; without one (or with ``SEGQUANT_COMPILE=0``) the same functions run
eagerly. Outputs: ``codes [P·M, K]`` (uint8 with offset 128 for oneDNN, or int8) and the per-row scale
(a float for static single-scale inputs, else an fp32 ``[P·M, 1]`` tensor).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from functools import cache

import torch

from segquant_core.formats import TINY_AMAX
from segquant_core.quantizers import ActivationSpec, Granularity

logger = logging.getLogger(__name__)


# Each flavour is its own function (its own compile cache). Scales arrive as 0-dim tensors and the smoothing
# vector is always a tensor (ones when absent) so that Dynamo does not specialise on their values.
def _static_single(x: torch.Tensor, smooth: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    xf = x.float() / smooth
    offset = 128.0 if dtype == torch.uint8 else 0.0
    codes = torch.clamp(torch.round(xf / scale), -128.0, 127.0)
    return (codes + offset if offset else codes).to(dtype)


def _halves(xf: torch.Tensor, sp: torch.Tensor, sn: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Both DualScale halves ``[2·M, K]`` (positive codes, then negative codes) of ``xf [M, K]``.

    Written as one broadcast over ``[2, M, K]`` with a per-half sign (``(xf·s).clamp(min=0)·s`` is the
    positive part for s = 1 and the negative part for s = -1, exactly) rather than a ``cat`` of the two
    halves: Inductor lowers a cat to one loop with a masked load per element, which it does not vectorise,
    and the static dual encode then cost ~5x a single-scale one (1024x6144, docs/benchmarks.md). The codes
    are the same: pos = clamp(round(x⁺ / sp), 0, 127), neg = clamp(round(x⁻ / sn), -128, 0).
    ``sp``/``sn`` are 0-dim (static), ``[1, 1]`` (per tensor) or ``[M, 1]`` (per token).
    """
    sign = torch.tensor([1.0, -1.0], device=xf.device).reshape(2, 1, 1)
    scale = torch.stack((sp, sn)).reshape(2, -1, 1)
    codes = torch.clamp(torch.round((xf * sign).clamp(min=0.0) * sign / scale), -128.0, 127.0)
    codes = codes + 128.0 if dtype == torch.uint8 else codes
    return codes.to(dtype).reshape(2 * xf.shape[0], xf.shape[1])


def _static_dual(
    x: torch.Tensor, smooth: torch.Tensor, sp: torch.Tensor, sn: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    return _halves(x.float() / smooth, sp, sn, dtype)


def _scale(amax: torch.Tensor, denom: float) -> torch.Tensor:
    return torch.where(amax > TINY_AMAX, amax / denom, torch.ones_like(amax))


def _single_codes(xf: torch.Tensor, amax: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    offset = 128.0 if dtype == torch.uint8 else 0.0
    scale = _scale(amax, 127.0)
    codes = torch.clamp(torch.round(xf / scale), -128.0, 127.0)
    return (codes + offset if offset else codes).to(dtype), scale.expand(xf.shape[0], 1)


def _dual_codes(
    xf: torch.Tensor, ap: torch.Tensor, an: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    sp, sn = _scale(ap, 127.0), _scale(an, 128.0)
    m = xf.shape[0]
    return _halves(xf, sp, sn, dtype), torch.cat((sp.expand(m, 1), sn.expand(m, 1)))


def _token_single(x: torch.Tensor, smooth: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    xf = x.float() / smooth
    return _single_codes(xf, xf.abs().amax(dim=-1, keepdim=True), dtype)


def _tensor_single(x: torch.Tensor, smooth: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    xf = x.float() / smooth
    return _single_codes(xf, xf.abs().amax().reshape(1, 1), dtype)


def _token_dual(x: torch.Tensor, smooth: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    xf = x.float() / smooth
    xp, xn = xf.clamp(min=0.0), xf.clamp(max=0.0)
    return _dual_codes(xf, xp.amax(dim=-1, keepdim=True), (-xn).amax(dim=-1, keepdim=True), dtype)


def _tensor_dual(x: torch.Tensor, smooth: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    xf = x.float() / smooth
    xp, xn = xf.clamp(min=0.0), xf.clamp(max=0.0)
    return _dual_codes(xf, xp.amax().reshape(1, 1), (-xn).amax().reshape(1, 1), dtype)


_FLAVOURS: dict[str, Callable] = {
    "static_single": _static_single,
    "static_dual": _static_dual,
    "token_single": _token_single,
    "tensor_single": _tensor_single,
    "token_dual": _token_dual,
    "tensor_dual": _tensor_dual,
}


def flavour(name: str) -> Callable:
    """Flavour ``name`` as plain torch ops: traced inside a compiled denoiser, Inductor fuses it into the op
    that produced ``x`` (:mod:`segquant_core.backends.ops`)."""
    return _FLAVOURS[name]


def compile_enabled() -> bool:
    return os.environ.get("SEGQUANT_COMPILE", "1") not in ("0", "false", "no")


@cache
def _kernel(name: str) -> Callable:
    """Flavour ``name``, compiled once (or eager when compilation is off)."""
    fn = _FLAVOURS[name]
    if not compile_enabled():
        return fn
    # A model feeds each flavour a handful of variants (input dtype, contiguous or column-sliced segments,
    # 0/1-sized dims): allow more than Dynamo's default of 8 compiled versions per function.
    import torch._dynamo

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return torch.compile(fn, dynamic=True, fullgraph=True)


# Up to this many input elements the flavours run eagerly: on a few rows (AdaLN's M = batch) the handful of
# tiny eager ops costs ~20 µs, while entering a compiled region (guards, cache lookup) costs ~70 µs.
EAGER_MAX_ELEMENTS = 1 << 16


def _call(name: str, *args: object) -> object:
    x = args[0]
    if isinstance(x, torch.Tensor) and x.numel() <= EAGER_MAX_ELEMENTS:
        return _FLAVOURS[name](*args)
    try:
        return _kernel(name)(*args)
    except Exception as e:  # a missing compiler surfaces at the first call
        if not compile_enabled():
            raise
        logger.warning("segquant: compiled activation quantizer failed (%s); quantizing eagerly", e)
        os.environ["SEGQUANT_COMPILE"] = "0"
        _kernel.cache_clear()
        return _kernel(name)(*args)


@cache
def _ones(k: int, device: str) -> torch.Tensor:
    return torch.ones(k, device=device)


def encode_rows(
    x: torch.Tensor,
    spec: ActivationSpec,
    static_scales: torch.Tensor | None,
    smooth: torch.Tensor | None,
    *,
    unsigned: bool,
    as_float: bool = False,
) -> tuple[torch.Tensor, float | torch.Tensor]:
    """Int8 activation codes of ``x [M, K]`` as ``[P·M, K]`` rows plus their scale (float or ``[P·M, 1]``).

    ``unsigned=True`` shifts codes by +128 into uint8 (oneDNN's fast u8 path); ``as_float=True`` returns
    the (integer-valued) codes as fp32, for kernels that take float input; else int8.
    """
    if spec.fmt.value != "int8":
        raise ValueError(f"encode_rows handles int8 activations, not {spec.fmt.value}")
    dtype = torch.float32 if as_float else torch.uint8 if unsigned else torch.int8
    if smooth is None:
        smooth = _ones(x.shape[-1], str(x.device))
    if not spec.dynamic:
        if static_scales is None:
            raise ValueError("a static activation quantizer has no calibrated scale yet")
        scales = static_scales.float().reshape(-1)
        if spec.dual:
            codes = _call("static_dual", x, smooth, scales[0], scales[1], dtype)
            m = x.shape[0]
            row = torch.empty(2 * m, 1, dtype=torch.float32, device=x.device)
            row[:m], row[m:] = scales[0], scales[1]
            return codes, row  # type: ignore[return-value]
        return _call("static_single", x, smooth, scales[0], dtype), float(scales[0])  # type: ignore[return-value]
    kind = "token" if spec.granularity is Granularity.TOKEN else "tensor"
    codes, row = _call(f"{kind}_{'dual' if spec.dual else 'single'}", x, smooth, dtype)  # type: ignore[misc]
    return codes, row.float()


def encode_channels(x: torch.Tensor, smooth: torch.Tensor, scales: torch.Tensor, *, unsigned: bool) -> torch.Tensor:
    """Codes of ``x [M, K]`` for in-segments with static single scales, all segments in one pass.

    ``smooth`` and ``scales`` are per input channel (each segment's value repeated over its channels); the
    arithmetic per element is that of :func:`encode_rows` on the segment alone, so the codes are the same.
    """
    # the single-scale flavour broadcasts a per-channel scale vector exactly like a scalar one
    return _call("static_single", x, smooth, scales, torch.uint8 if unsigned else torch.int8)  # type: ignore[return-value]
