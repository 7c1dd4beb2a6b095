"""Number formats: integer and fp8 codes, int4 packing, and the one scale convention used everywhere.

Scale convention (the whole engine, every backend and the artifact format use it):
    a *scale* is a step size — the value of one code — so ``x̂ = code · scale`` and
    ``code = clamp(round_half_even(x / scale), qmin, qmax)``.
This is the convention of PyTorch, oneDNN, ONNX QDQ and ``torch._scaled_mm``. The SegQuant paper and its
reference code write the inverse ("quant scale" ``qmax / amax``); our ``scale`` is ``1 / that``.

For a symmetric b-bit integer format ``scale = amax / qmax``; for the negative side of a DualScale quantizer
``scale⁻ = amax⁻ / |qmin|`` (e.g. ``amax⁻ / 128`` for int8), so the whole code range is used on both sides.
For fp8 e4m3 ``scale = amax / 448`` on either side. A range at or below ``TINY_AMAX`` gets scale 1, which
maps it to code 0 instead of dividing by ~0.

int4 packing: two's-complement nibbles, two per byte along the last (K) axis; element ``2j`` goes in the
*low* nibble and ``2j + 1`` in the *high* nibble of byte ``j``. K must be even.
"""

from __future__ import annotations

import enum

import torch

TINY_AMAX = 2.0**-24
FP8_E4M3_MAX = 448.0


class QuantFormat(str, enum.Enum):
    """Storage/compute format of a quantized tensor."""

    INT8 = "int8"
    INT4 = "int4"
    FP8_E4M3 = "fp8_e4m3"

    @property
    def is_int(self) -> bool:
        return self in (QuantFormat.INT8, QuantFormat.INT4)

    @property
    def bits(self) -> int:
        return 4 if self is QuantFormat.INT4 else 8

    @property
    def qmax(self) -> float:
        """Largest positive code magnitude."""
        if self is QuantFormat.FP8_E4M3:
            return FP8_E4M3_MAX
        return float(2 ** (self.bits - 1) - 1)

    @property
    def qmin(self) -> float:
        """Most negative code (negative number)."""
        if self is QuantFormat.FP8_E4M3:
            return -FP8_E4M3_MAX
        return float(-(2 ** (self.bits - 1)))

    @property
    def code_dtype(self) -> torch.dtype:
        """dtype of unpacked codes (int4 codes live in int8 until packed)."""
        return torch.float8_e4m3fn if self is QuantFormat.FP8_E4M3 else torch.int8

    @classmethod
    def parse(cls, value: str | QuantFormat) -> QuantFormat:
        if isinstance(value, QuantFormat):
            return value
        aliases = {"fp8": cls.FP8_E4M3, "e4m3": cls.FP8_E4M3, "fpe4m3": cls.FP8_E4M3}
        key = str(value).lower()
        if key in aliases:
            return aliases[key]
        try:
            return cls(key)
        except ValueError:
            allowed = ", ".join(f.value for f in cls)
            raise ValueError(f"unknown quantization format {value!r}; expected one of: {allowed}") from None


def scale_from_amax(amax: torch.Tensor, fmt: QuantFormat, side: str = "both") -> torch.Tensor:
    """Step size that maps ``amax`` onto the edge of the code range.

    ``side="both"`` (symmetric) and ``"pos"`` divide by ``qmax``; ``"neg"`` (DualScale's negative side,
    ``amax`` given as a magnitude) divides by ``|qmin|``. Ranges ≤ ``TINY_AMAX`` get scale 1.
    """
    amax = amax.float().abs()
    denom = -fmt.qmin if side == "neg" else fmt.qmax
    scale = amax / denom
    return torch.where(amax > TINY_AMAX, scale, torch.ones_like(scale))


def quantize(
    x: torch.Tensor, scale: torch.Tensor, fmt: QuantFormat, lo: float | None = None, hi: float | None = None
) -> torch.Tensor:
    """Codes of ``x`` (computed in fp32) with step ``scale``; ``lo``/``hi`` narrow the code range.

    Integers round half-to-even and come back as int8 (int4 codes too, unpacked); fp8 saturates at
    ±448 before the cast because torch's cast does not saturate.
    """
    lo = fmt.qmin if lo is None else lo
    hi = fmt.qmax if hi is None else hi
    y = x.float() / scale
    if fmt.is_int:
        return torch.clamp(torch.round(y), lo, hi).to(torch.int8)
    return torch.clamp(y, lo, hi).to(torch.float8_e4m3fn)


def dequantize(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``codes · scale`` in fp32 (codes must be unpacked)."""
    return codes.float() * scale


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Pack int4 codes (int8 tensor with values in [-8, 7]) two per byte along the last axis."""
    if codes.shape[-1] % 2:
        raise ValueError(f"int4 packing needs an even last dimension, got {codes.shape[-1]}")
    if codes.numel() and (int(codes.min()) < -8 or int(codes.max()) > 7):
        raise ValueError("int4 codes must lie in [-8, 7]")
    nib = (codes.to(torch.int16) & 0xF).to(torch.uint8)
    return nib[..., 0::2] | (nib[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: uint8 ``[..., K/2]`` → int8 codes ``[..., K]``."""
    low = (packed & 0xF).to(torch.int8)
    high = ((packed >> 4) & 0xF).to(torch.int8)
    both = torch.stack((low, high), dim=-1).flatten(-2)
    return torch.where(both > 7, both - 16, both)


def storage_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()
