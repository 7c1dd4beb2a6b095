"""segquant_core.quantizers: weight / activation quantizers and DualScale (§11.2 items 3–9, B7)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from segquant_core.formats import QuantFormat, unpack_int4
from segquant_core.quantizers import (
    ActivationSpec,
    Granularity,
    WeightSpec,
    activation_amax,
    activation_scales,
    decode_activation,
    encode_activation,
    encode_weight,
    fake_quantize_activation,
    fake_quantize_weight,
    weight_scale,
)

from .conftest import gen

INT8_T = ActivationSpec("int8", "tensor", dynamic=False)
INT8_T_DYN = ActivationSpec("int8", "tensor", dynamic=True)
INT8_TOK = ActivationSpec("int8", "token", dynamic=True)


# §11.2 item 3: scale shapes and broadcasting ------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["int8", "int4", "fp8_e4m3"])
def test_item03_weight_scale_shapes(fmt):
    w = torch.randn(24, 16, generator=gen(0))
    per_channel = weight_scale(w, WeightSpec(fmt, "channel"))
    per_tensor = weight_scale(w, WeightSpec(fmt, "tensor"))
    assert per_channel.shape == (24,)
    assert per_tensor.shape == (1,)
    qmax = QuantFormat.parse(fmt).qmax
    assert torch.allclose(per_channel, w.abs().amax(dim=1) / qmax)
    assert torch.allclose(per_tensor, w.abs().amax().reshape(1) / qmax)


def test_item03_per_channel_weight_broadcasts_per_row():
    # rows of very different magnitude: per-channel keeps every row accurate, per-tensor crushes the small one
    w = torch.randn(2, 64, generator=gen(1)) * torch.tensor([[100.0], [0.01]])
    qc = encode_weight(w, WeightSpec("int8", "channel"))
    assert qc.scale.shape == (2,)
    assert qc.data.dtype == torch.int8 and qc.shape == (2, 64)
    assert (qc.dequantize() - w).abs().amax(dim=1).le(qc.scale / 2 + 1e-9).all()
    qt = fake_quantize_weight(w, WeightSpec("int8", "tensor"))
    assert torch.count_nonzero(qt[1]) == 0  # small row rounds to zero under one shared scale
    assert torch.count_nonzero(qc.dequantize()[1]) > 0


def test_item03_int4_weight_is_packed():
    w = torch.randn(8, 32, generator=gen(2))
    q = encode_weight(w, WeightSpec("int4", "channel"))
    assert q.data.dtype == torch.uint8 and q.data.shape == (8, 16)
    assert q.shape == (8, 32)
    codes = unpack_int4(q.data)
    assert int(codes.min()) >= -8 and int(codes.max()) <= 7
    assert (q.dequantize() - w).abs().amax(dim=1).le(q.scale / 2 + 1e-7).all()
    assert q.nbytes() == 8 * 16 + 8 * 4


def test_item03_per_token_dynamic_scale_shapes():
    x = torch.randn(5, 16, generator=gen(3)) * torch.arange(1, 6).reshape(5, 1)
    codes, scales = encode_activation(x, INT8_TOK)
    assert codes.shape == (1, 5, 16) and scales.shape == (1, 5, 1)
    assert torch.allclose(scales[0, :, 0], x.abs().amax(dim=1) / 127)
    dual = ActivationSpec("int8", "token", dynamic=True, dual=True)
    codes, scales = encode_activation(x, dual)
    assert codes.shape == (2, 5, 16) and scales.shape == (2, 5, 1)
    # per-tensor: one scale broadcast over every row
    codes, scales = encode_activation(x, INT8_T_DYN)
    assert codes.shape == (1, 5, 16) and scales.shape == (1, 1, 1)


def test_item03_fake_activation_keeps_leading_dims_and_token_scale_is_per_row():
    x = torch.randn(2, 3, 8, generator=gen(4))
    x[1, 2] *= 1000  # one huge token
    y = fake_quantize_activation(x, INT8_TOK)
    assert y.shape == x.shape
    # per-token: the other tokens are unaffected by the huge one
    small = torch.ones(2, 3, dtype=torch.bool)
    small[1, 2] = False
    assert (y[small] - x[small]).abs().max() <= x[small].abs().max() / 127
    y_t = fake_quantize_activation(x, INT8_T_DYN)
    assert (y_t[small] - x[small]).abs().max() > 1.0  # per-tensor: crushed by the outlier token


def test_specs_reject_bad_granularity():
    with pytest.raises(ValueError, match=r"tensor.*channel"):
        WeightSpec("int8", "token")
    with pytest.raises(ValueError, match=r"tensor.*token"):
        ActivationSpec("int8", "channel", dynamic=True)


def test_b7_static_per_token_activation_scales_rejected():
    # B7: static per-token scales would be tied to the calibration batch size / sequence length.
    with pytest.raises(ValueError, match="dynamic"):
        ActivationSpec("int8", "token", dynamic=False)
    with pytest.raises(ValueError, match="dynamic"):
        ActivationSpec("int4", Granularity.TOKEN)
    assert ActivationSpec("int8", "token", dynamic=True).granularity is Granularity.TOKEN


# §11.2 item 4: static vs dynamic -----------------------------------------------------------------------
def test_item04_static_uses_calibrated_scale_and_clips():
    calib = torch.randn(64, 16, generator=gen(5))
    amax, _ = activation_amax(calib, INT8_T)
    static = activation_scales(INT8_T, amax, None).reshape(-1)
    assert static.shape == (1,)
    x = calib * 10  # 10× the calibrated range
    y_static = fake_quantize_activation(x, INT8_T, static)
    # clipped at the calibrated range: +amax (code 127) and -amax·128/127 (code -128)
    assert float(y_static.max()) == pytest.approx(float(amax), rel=1e-6)
    assert float(y_static.min()) == pytest.approx(-float(amax) * 128 / 127, rel=1e-6)
    y_dyn = fake_quantize_activation(x, INT8_T_DYN)
    assert float((y_dyn - x).abs().max()) <= float(x.abs().max()) / 127 / 2 * 1.0001  # dynamic adapts
    # same input as calibration: static and dynamic agree exactly
    assert torch.equal(fake_quantize_activation(calib, INT8_T, static), fake_quantize_activation(calib, INT8_T_DYN))


def test_item04_static_without_scale_raises():
    with pytest.raises(ValueError, match="calibrated"):
        encode_activation(torch.randn(2, 4), INT8_T)


def test_encode_activation_never_writes_input():
    x = torch.randn(6, 8, generator=gen(6))
    before = x.clone()
    for spec in (
        INT8_T_DYN,
        INT8_TOK,
        ActivationSpec("int8", "tensor", True, True),
        ActivationSpec("fp8", "token", True, True),
    ):
        fake_quantize_activation(x, spec)
    assert torch.equal(x, before)


# DualScale: §11.2 items 5–9 -----------------------------------------------------------------------------
def test_item05_dual_scale_formulas_int8():
    spec = ActivationSpec("int8", "tensor", dynamic=False, dual=True)
    x = torch.tensor([[3.0, -0.25, 10.0, -0.5, 0.0]])
    pos, neg = activation_amax(x, spec)
    assert pos.tolist() == [10.0] and neg.tolist() == [0.5]
    scales = activation_scales(spec, pos, neg)
    assert scales.shape == (2, 1)
    assert scales[0].item() == pytest.approx(10.0 / 127)
    assert scales[1].item() == pytest.approx(0.5 / 128)


def test_item05_dual_scale_formulas_fp8_and_int4_and_empty_side():
    x = torch.tensor([[3.0, -0.25, 10.0, -0.5]])
    fp8 = ActivationSpec("fp8", "tensor", dynamic=True, dual=True)
    s = activation_scales(fp8, *activation_amax(x, fp8))
    assert s.reshape(-1).tolist() == pytest.approx([10.0 / 448, 0.5 / 448])
    int4 = ActivationSpec("int4", "tensor", dynamic=True, dual=True)
    s = activation_scales(int4, *activation_amax(x, int4))
    assert s.reshape(-1).tolist() == pytest.approx([10.0 / 7, 0.5 / 8])
    # all-positive input: the (empty) negative side gets scale 1
    s = activation_scales(fp8, *activation_amax(x.clamp(min=0), fp8))
    assert s.reshape(-1)[1].item() == 1.0
    with pytest.raises(ValueError):
        activation_scales(fp8, torch.ones(1), None)


def test_item05_dual_per_token_scales():
    spec = ActivationSpec("int8", "token", dynamic=True, dual=True)
    x = torch.tensor([[1.0, -2.0, 4.0], [-8.0, 0.5, 0.25]])
    _, scales = encode_activation(x, spec)
    assert scales[0, :, 0].tolist() == pytest.approx([4.0 / 127, 0.5 / 127])
    assert scales[1, :, 0].tolist() == pytest.approx([2.0 / 128, 8.0 / 128])


@pytest.mark.parametrize("fmt", ["int8", "int4", "fp8"])
@pytest.mark.parametrize("gran", ["tensor", "token"])
def test_item06_dual_code_signs(fmt, gran):
    spec = ActivationSpec(fmt, gran, dynamic=True, dual=True)
    x = F.silu(torch.randn(16, 64, generator=gen(7)) * 4)
    codes, _ = encode_activation(x, spec)
    pos_codes, neg_codes = codes[0].float(), codes[1].float()
    assert (pos_codes >= 0).all() and (neg_codes <= 0).all()
    assert (pos_codes[x < 0] == 0).all()  # a negative input contributes nothing to the positive half
    assert (neg_codes[x > 0] == 0).all()
    assert (pos_codes > 0).any() and (neg_codes < 0).any()
    # the negative side uses the full range: the most negative input maps to qmin
    if fmt != "fp8" and gran == "tensor":
        assert neg_codes.min().item() == QuantFormat.parse(fmt).qmin


def _silu_like(seed: int = 8) -> torch.Tensor:
    x = F.silu(torch.randn(4096, 64, generator=gen(seed)) * 3)
    return x * (10.0 / x.max())  # positive tail exactly 10; negative side ≈ [-0.28·10/max, 0]


@pytest.mark.parametrize("gran", ["tensor", "token"])
def test_item07_dual_scale_cuts_negative_side_mse_on_silu_data(gran):
    x = _silu_like()
    assert x.max() == pytest.approx(10.0)
    single = ActivationSpec("int8", gran, dynamic=True)
    dual = ActivationSpec("int8", gran, dynamic=True, dual=True)
    neg = x < 0
    mse_single = float(((fake_quantize_activation(x, single) - x)[neg] ** 2).mean())
    mse_dual = float(((fake_quantize_activation(x, dual) - x)[neg] ** 2).mean())
    assert mse_single > 10 * mse_dual, (mse_single, mse_dual)
    # the positive side is unchanged by DualScale (same scale pos_amax/127 = amax/127 there)
    pos = x >= 0
    if gran == "tensor":
        assert torch.equal(fake_quantize_activation(x, single)[pos], fake_quantize_activation(x, dual)[pos])


@pytest.mark.parametrize("gran", ["tensor", "token"])
@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_item08_fake_equals_two_gemm_formulation(gran, fmt):
    spec = ActivationSpec(fmt, gran, dynamic=True, dual=True)
    x = _silu_like(9)[:32]
    w = torch.randn(24, 64, generator=gen(10))
    codes, scales = encode_activation(x, spec)
    xp, xn = codes[0].double(), codes[1].double()
    # Two GEMMs on the codes, each dequantized with its own (per-row) scale, then added.
    y_two = (xp @ w.double().t()) * scales[0].double() + (xn @ w.double().t()) * scales[1].double()
    y_fake = fake_quantize_activation(x, spec).double() @ w.double().t()
    assert torch.allclose(y_two, y_fake, rtol=1e-6, atol=1e-6)
    assert torch.allclose(decode_activation(codes, scales), fake_quantize_activation(x, spec))


@pytest.mark.parametrize("gran,dynamic", [("tensor", False), ("tensor", True), ("token", True)])
def test_item09_all_positive_input_dual_equals_single(gran, dynamic):
    x = torch.relu(torch.randn(32, 16, generator=gen(11))) * 5
    assert (x >= 0).all()
    single = ActivationSpec("int8", gran, dynamic=dynamic)
    dual = ActivationSpec("int8", gran, dynamic=dynamic, dual=True)
    s_single = s_dual = None
    if not dynamic:
        s_single = activation_scales(single, *activation_amax(x, single)).reshape(-1)
        s_dual = activation_scales(dual, *activation_amax(x, dual)).reshape(-1)
        assert s_dual[0] == s_single[0]
    assert torch.equal(fake_quantize_activation(x, dual, s_dual), fake_quantize_activation(x, single, s_single))
