"""segquant_core.formats: integer / fp8 codes, rounding, int4 packing, scale_from_amax (§11.2 items 1, 2, 34)."""

from __future__ import annotations

import pytest
import torch

from segquant_core.formats import (
    FP8_E4M3_MAX,
    TINY_AMAX,
    QuantFormat,
    dequantize,
    pack_int4,
    quantize,
    scale_from_amax,
    unpack_int4,
)

INT_FORMATS = [QuantFormat.INT8, QuantFormat.INT4]


# §11.2 item 1 ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", INT_FORMATS)
def test_item01_int_codes_in_range_and_dtype(fmt):
    x = torch.randn(4096) * 50  # far beyond the range at scale 0.1 too
    codes = quantize(x, torch.tensor(0.1), fmt)
    assert codes.dtype == torch.int8
    assert int(codes.min()) == fmt.qmin and int(codes.max()) == fmt.qmax  # both ends reached
    assert fmt.qmin == -(2 ** (fmt.bits - 1)) and fmt.qmax == 2 ** (fmt.bits - 1) - 1


def test_item01_round_half_to_even_at_scale_one():
    x = torch.tensor([0.5, 1.5, 2.5, 3.5, -0.5, -1.5, -2.5, 0.49, 0.51, -3.5])
    codes = quantize(x, torch.tensor(1.0), QuantFormat.INT8)
    assert codes.tolist() == [0, 2, 2, 4, 0, -2, -2, 0, 1, -4]


@pytest.mark.parametrize("fmt", INT_FORMATS)
def test_item01_round_trip_error_within_half_step_inside_range(fmt):
    g = torch.Generator().manual_seed(0)
    scale = torch.tensor(0.037)
    x = (torch.rand(10000, generator=g) * 2 - 1) * fmt.qmax * float(scale)  # inside [-qmax·s, qmax·s]
    xhat = dequantize(quantize(x, scale, fmt), scale)
    err = (x - xhat).abs()
    assert float(err.max()) <= float(scale) / 2 + 1e-7
    assert float(err.max()) > float(scale) / 4  # the bound is meaningful (not trivially tiny)


@pytest.mark.parametrize("fmt", INT_FORMATS)
def test_item01_clamps_outside_range(fmt):
    scale = torch.tensor(0.5)
    x = torch.tensor([1e6, -1e6, fmt.qmax * 0.5 + 3.0, fmt.qmin * 0.5 - 3.0])
    xhat = dequantize(quantize(x, scale, fmt), scale)
    assert xhat.tolist() == [fmt.qmax * 0.5, fmt.qmin * 0.5, fmt.qmax * 0.5, fmt.qmin * 0.5]


def test_item01_per_row_scale_broadcasts():
    x = torch.tensor([[1.0, -2.0], [10.0, -20.0]])
    scale = torch.tensor([[2.0 / 127], [20.0 / 127]])
    codes = quantize(x, scale, QuantFormat.INT8)
    assert codes.tolist() == [[64, -127], [64, -127]]


def test_item01_lo_hi_narrow_the_code_range():
    x = torch.tensor([-3.0, -1.0, 0.0, 1.0, 3.0])
    assert quantize(x, torch.tensor(1.0), QuantFormat.INT8, lo=0.0).tolist() == [0, 0, 0, 1, 3]
    assert quantize(x, torch.tensor(1.0), QuantFormat.INT8, hi=0.0).tolist() == [-3, -1, 0, 0, 0]


def test_quantize_does_not_modify_input():
    x = torch.randn(64)
    before = x.clone()
    quantize(x, torch.tensor(0.01), QuantFormat.INT8)
    quantize(x, torch.tensor(0.01), QuantFormat.FP8_E4M3)
    assert torch.equal(x, before)


# §11.2 item 2 ---------------------------------------------------------------------------------------
def test_item02_fp8_equals_saturating_cast():
    g = torch.Generator().manual_seed(1)
    scale = torch.tensor(0.01)
    x = torch.randn(5000, generator=g) * 3  # |x| up to ~15 → up to ~1500 in code units, well past 448
    codes = quantize(x, scale, QuantFormat.FP8_E4M3)
    assert codes.dtype == torch.float8_e4m3fn
    expected = torch.clamp(x / scale, -448, 448).to(torch.float8_e4m3fn).float() * scale
    got = dequantize(codes, scale)
    assert torch.equal(got, expected)
    assert torch.isfinite(got).all()
    # values beyond 448·scale clamp to exactly ±448·scale
    beyond = x.abs() > 448 * float(scale)
    assert beyond.sum() > 100
    assert torch.allclose(got[beyond].abs(), torch.full_like(got[beyond], 448 * float(scale)))


def test_item02_fp8_saturates_huge_values_and_inf():
    # The clamp before the cast keeps huge values (and inf) at ±448 codes whatever torch's cast does.
    x = torch.tensor([1000.0, -1e6, float("inf"), -float("inf"), 447.0])
    codes = quantize(x, torch.tensor(1.0), QuantFormat.FP8_E4M3).float()
    assert codes.tolist() == [448.0, -448.0, 448.0, -448.0, 448.0]  # 447 rounds to the e4m3 grid point 448


# int4 packing (§11.2 item 34) -------------------------------------------------------------------------
def test_item34_int4_pack_nibble_order():
    codes = torch.tensor([[1, -2]], dtype=torch.int8)
    packed = pack_int4(codes)
    assert packed.dtype == torch.uint8
    assert packed.tolist() == [[0xE1]]  # low nibble = even K index (1), high nibble = odd K index (-2 → 0xE)
    codes = torch.tensor([[7, -8, 0, -1]], dtype=torch.int8)
    assert pack_int4(codes).tolist() == [[0x87, 0xF0]]


def test_item34_int4_pack_unpack_round_trip():
    g = torch.Generator().manual_seed(2)
    codes = torch.randint(-8, 8, (3, 5, 64), generator=g, dtype=torch.int8)
    packed = pack_int4(codes)
    assert packed.shape == (3, 5, 32)
    assert torch.equal(unpack_int4(packed), codes)
    assert unpack_int4(packed).dtype == torch.int8


def test_item34_int4_pack_rejects_odd_k_and_out_of_range():
    with pytest.raises(ValueError, match="even"):
        pack_int4(torch.zeros(2, 3, dtype=torch.int8))
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        pack_int4(torch.tensor([[8, 0]], dtype=torch.int8))
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        pack_int4(torch.tensor([[0, -9]], dtype=torch.int8))


# scale_from_amax --------------------------------------------------------------------------------------
def test_scale_from_amax_formulas():
    amax = torch.tensor([254.0, 1.0])
    assert torch.equal(scale_from_amax(amax, QuantFormat.INT8), amax / 127)
    assert torch.equal(scale_from_amax(amax, QuantFormat.INT8, "pos"), amax / 127)
    assert torch.equal(scale_from_amax(amax, QuantFormat.INT8, "neg"), amax / 128)
    assert torch.equal(scale_from_amax(amax, QuantFormat.INT4), amax / 7)
    assert torch.equal(scale_from_amax(amax, QuantFormat.INT4, "neg"), amax / 8)
    assert torch.equal(scale_from_amax(amax, QuantFormat.FP8_E4M3), amax / FP8_E4M3_MAX)
    assert torch.equal(scale_from_amax(amax, QuantFormat.FP8_E4M3, "neg"), amax / 448)
    # magnitudes: a negative amax is treated as its absolute value
    assert torch.equal(scale_from_amax(torch.tensor([-254.0]), QuantFormat.INT8), torch.tensor([2.0]))


def test_scale_from_amax_tiny_range_gets_scale_one():
    amax = torch.tensor([0.0, TINY_AMAX, TINY_AMAX / 2, 2 * TINY_AMAX])
    s = scale_from_amax(amax, QuantFormat.INT8)
    assert s[:3].tolist() == [1.0, 1.0, 1.0]
    assert s[3].item() == pytest.approx(2 * TINY_AMAX / 127)
    # ... which maps such a tensor to code 0 instead of dividing by ~0
    assert quantize(torch.tensor([1e-9]), s[0], QuantFormat.INT8).item() == 0


def test_format_parse_aliases_and_errors():
    assert QuantFormat.parse("fp8") is QuantFormat.FP8_E4M3
    assert QuantFormat.parse("E4M3") is QuantFormat.FP8_E4M3
    assert QuantFormat.parse("int4") is QuantFormat.INT4
    with pytest.raises(ValueError, match="int8, int4, fp8_e4m3"):
        QuantFormat.parse("int5")
    assert QuantFormat.FP8_E4M3.qmax == 448 and QuantFormat.FP8_E4M3.qmin == -448
