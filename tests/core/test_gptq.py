"""GPTQ weight rounding (§11.2 items 32–34)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from segquant_core import quantize, recipe
from segquant_core.calibrate.gptq import gptq_quantize
from segquant_core.detect.plan import LayerPlan, Plan, Segments
from segquant_core.formats import pack_int4, unpack_int4
from segquant_core.quantizers import WeightSpec, encode_weight, weight_scale

from .conftest import gen

INT4_CH = WeightSpec("int4", "channel")


def _correlated(n: int, k: int, seed: int) -> torch.Tensor:
    g = gen(seed)
    mix = torch.randn(k, k, generator=gen(99)) / k**0.5  # the same mixing for train and held-out data
    return torch.randn(n, k, generator=g) @ mix + 0.1 * torch.randn(n, k, generator=g)


def _out_mse(q, w_dtype_x: torch.Tensor, w: torch.Tensor) -> float:
    return float(((w_dtype_x @ q.dequantize().t() - w_dtype_x @ w.t()) ** 2).mean())


# §11.2 item 32 ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", [INT4_CH, WeightSpec("int4", "tensor"), WeightSpec("int8", "channel")])
def test_item32_gptq_beats_rtn_on_held_out_inputs(spec):
    k, n = 128, 64
    w = torch.randn(n, k, generator=gen(1))
    x_train = _correlated(1024, k, 2)
    x_test = _correlated(512, k, 3)
    h = (x_train.double().t() @ x_train.double()) / x_train.shape[0]
    q_gptq, info = gptq_quantize(w, h, spec)
    q_rtn = encode_weight(w, spec)
    assert not info.fell_back_to_rtn and info.dead_columns == 0 and info.attempts == 1
    assert torch.equal(q_gptq.scale, q_rtn.scale)  # same scales: only the rounding differs
    assert q_gptq.data.dtype == q_rtn.data.dtype and q_gptq.data.shape == q_rtn.data.shape
    mse_g, mse_r = _out_mse(q_gptq, x_test, w), _out_mse(q_rtn, x_test, w)
    assert mse_g <= mse_r
    if spec == INT4_CH:
        assert mse_g < 0.7 * mse_r, (mse_g, mse_r)  # a clear win where it matters


def test_item32_gptq_through_quantize_beats_rtn():
    k, n = 64, 32
    torch.manual_seed(0)
    base = nn.Linear(k, n)
    calls = [{"input": _correlated(256, k, 4)}, {"input": _correlated(256, k, 5)}]
    x_test = _correlated(256, k, 6)
    ref = base(x_test).detach()
    errs = {}
    for gptq in (False, True):
        m = nn.Sequential(nn.Linear(k, n))
        m.load_state_dict({"0.weight": base.weight, "0.bias": base.bias})
        res = quantize(
            m,
            recipe("w8a8", weight="int4", weight_granularity="channel", activation=None, gptq=gptq),
            calls,
            Plan([LayerPlan("0")]),
            progress=False,
        )
        errs[gptq] = float(((m(x_test).detach() - ref) ** 2).mean())
        if gptq:
            info = res.layers["0"].segments[0].gptq
            assert info is not None and info["fell_back_to_rtn"] is False
    assert errs[True] < 0.8 * errs[False], errs


def test_gptq_in_segments_use_their_own_hessian_blocks():
    m = nn.Sequential(nn.Linear(64, 16))
    calls = [{"input": _correlated(128, 64, 7)}]
    res = quantize(
        m,
        recipe("w8a8", weight="int4", weight_granularity="channel", seg=True, gptq=True),
        calls,
        Plan([LayerPlan("0", Segments("in", (16, 48)))]),
        progress=False,
    )
    segs = res.layers["0"].segments
    assert len(segs) == 2 and all(s.gptq and not s.gptq["fell_back_to_rtn"] for s in segs)
    assert [tuple(s.weight.shape) for s in m[0].segs] == [(16, 8), (16, 24)]  # packed int4


# §11.2 item 33: dead columns and Cholesky failure ------------------------------------------------------------
def test_item33_dead_columns_are_handled():
    k, n = 32, 16
    w = torch.randn(n, k, generator=gen(8))
    x = _correlated(512, k, 9)
    x[:, [3, 17]] = 0.0  # two input channels that never fire
    h = x.double().t() @ x.double() / x.shape[0]
    q, info = gptq_quantize(w, h, INT4_CH)
    assert info.dead_columns == 2 and not info.fell_back_to_rtn
    assert torch.isfinite(q.dequantize()).all()
    assert (q.dequantize()[:, [3, 17]] == 0).all()  # weights of dead inputs are zeroed
    assert torch.equal(q.scale, weight_scale(w, INT4_CH))  # scales from the un-modified weight
    # still no worse than RTN on such inputs
    x_test = _correlated(256, k, 10)
    x_test[:, [3, 17]] = 0.0
    assert _out_mse(q, x_test, w) <= _out_mse(encode_weight(w, INT4_CH), x_test, w)


@pytest.mark.parametrize("bad", ["nan", "negative_definite"])
def test_item33_cholesky_failure_falls_back_to_rtn(bad):
    k, n = 16, 8
    w = torch.randn(n, k, generator=gen(11))
    h = torch.full((k, k), float("nan"), dtype=torch.float64) if bad == "nan" else -torch.eye(k, dtype=torch.float64)
    q, info = gptq_quantize(w, h, INT4_CH, max_retries=2)
    assert info.fell_back_to_rtn is True
    assert info.attempts == 2
    rtn = encode_weight(w, INT4_CH)
    assert torch.equal(q.data, rtn.data) and torch.equal(q.scale, rtn.scale)


def test_item33_damping_retry_recovers_from_singular_hessian():
    k = 16
    w = torch.randn(8, k, generator=gen(12))
    h = torch.ones(k, k, dtype=torch.float64) - 1.001 * torch.eye(k, dtype=torch.float64)  # indefinite
    q, info = gptq_quantize(w, h, INT4_CH, max_retries=10)
    assert not info.fell_back_to_rtn and info.attempts > 1  # damping grew until Cholesky succeeded
    assert torch.isfinite(q.dequantize()).all()


def test_gptq_rejects_mismatched_hessian():
    with pytest.raises(ValueError, match="does not match"):
        gptq_quantize(torch.randn(4, 8), torch.eye(6, dtype=torch.float64), INT4_CH)


# §11.2 item 34: int4 packing order of the GPTQ output ------------------------------------------------------------
def test_item34_gptq_int4_output_packing_order():
    k, n = 32, 8
    w = torch.randn(n, k, generator=gen(13))
    x = _correlated(256, k, 14)
    q, _ = gptq_quantize(w, x.double().t() @ x.double() / 256, INT4_CH)
    assert q.data.dtype == torch.uint8 and q.data.shape == (n, k // 2)
    codes = unpack_int4(q.data)
    assert torch.equal(pack_int4(codes), q.data)
    # low nibble = even K index, high nibble = odd K index
    assert torch.equal((q.data & 0xF).to(torch.int16), (codes[:, 0::2].to(torch.int16) & 0xF))
    assert torch.equal((q.data >> 4).to(torch.int16), (codes[:, 1::2].to(torch.int16) & 0xF))
    assert torch.allclose(q.dequantize(), codes.float() * q.scale.reshape(-1, 1))
