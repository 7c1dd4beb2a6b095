"""Weight and activation quantizers built on :mod:`segquant_core.formats`.

Weights are quantized once, ahead of time, per tensor or per output channel. Activations are quantized
at run time with a *static* scale (calibrated per tensor) or a *dynamic* one (recomputed per tensor or per
token at every call). A DualScale activation quantizer keeps one scale for ``x ≥ 0`` and one for
``x < 0``: positive inputs only ever get codes ≥ 0 and negative inputs codes ≤ 0, so the narrow negative
tail after SiLU/GELU gets the full code range instead of a handful of levels.

Encoded activations use one layout for both kinds: ``codes[P, M, K]`` and ``scales[P, M or 1, 1]`` with
``P = 1`` (single scale) or ``P = 2`` (positive codes, then negative codes). ``x̂ = Σ_p codes[p] · scales[p]``,
and a GEMM over the ``P·M`` stacked rows computes both halves of a DualScale product in one call.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from segquant_core.formats import (
    QuantFormat,
    dequantize,
    pack_int4,
    quantize,
    scale_from_amax,
    unpack_int4,
)


class Granularity(str, enum.Enum):
    """How many scales a tensor gets: one, one per output channel (weights), one per token (activations)."""

    TENSOR = "tensor"
    CHANNEL = "channel"
    TOKEN = "token"


@dataclass(frozen=True)
class WeightSpec:
    fmt: QuantFormat
    granularity: Granularity = Granularity.TENSOR

    def __post_init__(self) -> None:
        object.__setattr__(self, "fmt", QuantFormat.parse(self.fmt))
        object.__setattr__(self, "granularity", Granularity(self.granularity))
        if self.granularity is Granularity.TOKEN:
            raise ValueError("weights are quantized per 'tensor' or per 'channel', not per 'token'")

    def to_dict(self) -> dict:
        return {"fmt": self.fmt.value, "granularity": self.granularity.value}


@dataclass(frozen=True)
class ActivationSpec:
    fmt: QuantFormat
    granularity: Granularity = Granularity.TENSOR
    dynamic: bool = False
    dual: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "fmt", QuantFormat.parse(self.fmt))
        object.__setattr__(self, "granularity", Granularity(self.granularity))
        if self.granularity is Granularity.CHANNEL:
            raise ValueError("activations are quantized per 'tensor' or per 'token', not per 'channel'")
        if self.granularity is Granularity.TOKEN and not self.dynamic:
            # Static per-token scales would be tied to the calibration batch and sequence length.
            raise ValueError("per-token activation scales must be dynamic (set dynamic=True)")

    @property
    def parts(self) -> int:
        return 2 if self.dual else 1

    def to_dict(self) -> dict:
        return {
            "fmt": self.fmt.value,
            "granularity": self.granularity.value,
            "dynamic": self.dynamic,
            "dual": self.dual,
        }


# --------------------------------------------------------------------------------------------- weights
@dataclass
class QuantizedWeight:
    """Weight codes of one ``[N, K]`` block plus its scales (``[N]`` per channel, ``[1]`` per tensor)."""

    data: torch.Tensor  # int8 codes, uint8 packed int4 ``[N, K/2]``, or float8_e4m3fn
    scale: torch.Tensor  # fp32
    fmt: QuantFormat

    @property
    def shape(self) -> tuple[int, int]:
        n, k = self.data.shape
        return (n, k * 2) if self.fmt is QuantFormat.INT4 else (n, k)

    def codes(self) -> torch.Tensor:
        """Unpacked codes (int8 for int4/int8, float8 for fp8)."""
        return unpack_int4(self.data) if self.fmt is QuantFormat.INT4 else self.data

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.codes(), self.scale.reshape(-1, 1))

    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size() + self.scale.numel() * 4


def weight_amax(w: torch.Tensor, granularity: Granularity) -> torch.Tensor:
    """``|w|`` max per output channel (``[N]``) or over the whole tensor (``[1]``)."""
    a = w.detach().float().abs()
    if granularity is Granularity.CHANNEL:
        return a.amax(dim=1)
    return a.amax().reshape(1)


def weight_scale(w: torch.Tensor, spec: WeightSpec) -> torch.Tensor:
    return scale_from_amax(weight_amax(w, spec.granularity), spec.fmt)


def encode_weight(w: torch.Tensor, spec: WeightSpec, scale: torch.Tensor | None = None) -> QuantizedWeight:
    """Round-to-nearest quantization of ``w [N, K]`` (scale from absmax unless given, e.g. by GPTQ)."""
    if w.dim() != 2:
        raise ValueError(f"weights must be 2-D [out, in], got shape {tuple(w.shape)}")
    scale = weight_scale(w, spec) if scale is None else scale.float().reshape(-1)
    codes = quantize(w, scale.reshape(-1, 1), spec.fmt)
    data = pack_int4(codes) if spec.fmt is QuantFormat.INT4 else codes
    return QuantizedWeight(data=data, scale=scale.clone(), fmt=spec.fmt)


def fake_quantize_weight(w: torch.Tensor, spec: WeightSpec) -> torch.Tensor:
    return encode_weight(w, spec).dequantize()


# ----------------------------------------------------------------------------------------- activations
def activation_amax(x: torch.Tensor, spec: ActivationSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Range of ``x [M, K]`` for ``spec``: ``(amax, None)`` or, for DualScale, ``(pos_amax, neg_amax)``.

    Shapes are ``[1]`` per tensor or ``[M]`` per token; ``neg_amax`` is a magnitude.
    """
    x = x.detach().float()
    per_token = spec.granularity is Granularity.TOKEN

    def reduce(t: torch.Tensor) -> torch.Tensor:
        return t.amax(dim=-1) if per_token else t.amax().reshape(1)

    if not spec.dual:
        return reduce(x.abs()), None
    return reduce(x.clamp(min=0)), reduce((-x).clamp(min=0))


def activation_scales(spec: ActivationSpec, amax: torch.Tensor, neg_amax: torch.Tensor | None) -> torch.Tensor:
    """Stacked scales ``[P, *amax.shape]`` from calibrated or dynamic ranges."""
    if not spec.dual:
        return scale_from_amax(amax, spec.fmt).unsqueeze(0)
    if neg_amax is None:
        raise ValueError("a DualScale quantizer needs both a positive and a negative range")
    return torch.stack((scale_from_amax(amax, spec.fmt, "pos"), scale_from_amax(neg_amax, spec.fmt, "neg")))


def encode_activation(
    x: torch.Tensor, spec: ActivationSpec, static_scales: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x [M, K]`` → ``(codes [P, M, K], scales [P, M|1, 1])``; never writes into ``x``.

    Static quantizers pass their calibrated ``static_scales`` (``[P]``); dynamic ones compute them here.
    """
    if x.dim() != 2:
        raise ValueError(f"activations are encoded as 2-D [tokens, features], got {tuple(x.shape)}")
    if spec.dynamic:
        scales = activation_scales(spec, *activation_amax(x, spec))
    elif static_scales is None:
        raise ValueError("a static activation quantizer has no calibrated scale yet")
    else:
        scales = static_scales.float().reshape(spec.parts, 1)
    scales = scales.reshape(spec.parts, -1, 1)
    fmt = spec.fmt
    if not spec.dual:
        return quantize(x, scales[0], fmt).unsqueeze(0), scales
    pos = quantize(x.clamp(min=0), scales[0], fmt, lo=0.0, hi=fmt.qmax)
    neg = quantize(x.clamp(max=0), scales[1], fmt, lo=fmt.qmin, hi=0.0)
    return torch.stack((pos, neg)), scales


def decode_activation(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``Σ_p codes[p] · scales[p]`` in fp32."""
    return (codes.float() * scales).sum(dim=0)


def fake_quantize_activation(
    x: torch.Tensor, spec: ActivationSpec, static_scales: torch.Tensor | None = None
) -> torch.Tensor:
    """Quantize-dequantize ``x`` (any shape, last dim = features) in fp32; the input is left untouched."""
    flat = x.reshape(-1, x.shape[-1])
    return decode_activation(*encode_activation(flat, spec, static_scales)).reshape(x.shape)
