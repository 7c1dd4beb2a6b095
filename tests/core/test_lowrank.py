"""The low-rank (SVDQuant-style) branch (§11.2 items 29–31, B5, B6)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from segquant_core import SegLinear, quantize, recipe
from segquant_core.backends import get_backend
from segquant_core.calibrate.lowrank import cap_rank, lowrank_split
from segquant_core.detect.plan import LayerPlan, Plan, Segments
from segquant_core.quantizers import fake_quantize_activation

from .conftest import AdaLNToy, adaln_calls, adaln_plan, gen, rel_err


# §11.2 item 29: exact reconstruction -----------------------------------------------------------------------
@pytest.mark.parametrize("shape,rank", [((48, 32), 8), ((16, 64), 4), ((32, 32), 31)])
def test_item29_lowrank_plus_residual_reconstructs_w(shape, rank):
    w = torch.randn(*shape, generator=gen(0))
    down, up, residual = lowrank_split(w, rank)
    n, k = shape
    assert down.shape == (k, rank) and up.shape == (rank, n) and residual.shape == (n, k)
    recon = (down.double() @ up.double()).t() + residual.double()
    assert torch.allclose(recon, w.double(), rtol=0, atol=1e-5)
    x = torch.randn(8, k, generator=gen(1), dtype=torch.float64)
    assert torch.allclose(x @ down.double() @ up.double() + x @ residual.double().t(), x @ w.double().t(), atol=1e-4)
    # the branch takes the top singular directions: the residual's spectral norm is σ_{r+1}
    sv = torch.linalg.svdvals(w.double())
    assert float(torch.linalg.matrix_norm(residual.double(), ord=2)) == pytest.approx(float(sv[rank]), rel=1e-4)


# §11.2 item 30 / B6: rank capped below the segment dimension ---------------------------------------------------
def test_item30_b6_cap_rank():
    assert cap_rank(64, 64, 256) == 63
    assert cap_rank(64, 256, 64) == 63
    assert cap_rank(8, 64, 64) == 8
    assert cap_rank(64, 1, 64) == 0
    w = torch.randn(8, 16, generator=gen(2))
    down, _up, residual = lowrank_split(w, 64)
    assert down.shape[1] == 7  # capped at min(8, 16) − 1
    assert residual.abs().max() > 1e-3  # the residual is not silently zero
    with pytest.raises(ValueError, match="rank must be < 1"):
        lowrank_split(torch.randn(1, 8), 4)


def test_item30_b6_rank_capped_and_flagged_in_quantize():
    # segments of 8 output features with lowrank=64 requested: rank capped at 7, flagged in the report
    m = nn.Sequential(nn.Linear(32, 24))
    calls = [{"input": torch.randn(32, 32, generator=gen(3))}]
    plan = Plan([LayerPlan("0", Segments("out", (8, 8, 8)))])
    res = quantize(m, recipe("w8a8", seg=True, lowrank=64), calls, plan, progress=False)
    rep = res.layers["0"]
    assert rep.lowrank_rank == 7 and rep.rank_capped is True
    layer: SegLinear = m[0]
    assert layer.cfg.lowrank_rank == 7
    for seg in layer.segs:
        assert seg.lowrank_down.shape == (32, 7) and seg.lowrank_up.shape == (7, 8)
        assert seg.quantized_weight().codes().abs().max() > 0  # the residual is quantized, not zero
    # not capped when the rank fits
    m2 = nn.Sequential(nn.Linear(32, 24))
    res2 = quantize(m2, recipe("w8a8", seg=True, lowrank=4), calls, plan, progress=False)
    assert res2.layers["0"].lowrank_rank == 4 and res2.layers["0"].rank_capped is False


def test_lowrank_reduces_error_on_low_rank_dominated_weight():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 64))
    with torch.no_grad():  # one huge direction plus small noise: per-tensor int8 crushes the noise part
        m[0].weight.copy_(20 * torch.randn(64, 1) @ torch.randn(1, 64) + 0.05 * torch.randn(64, 64))
    w = m[0].weight.detach().clone()
    b = m[0].bias.detach().clone()
    calls = [{"input": torch.randn(64, 64, generator=gen(4))}]
    x = torch.randn(32, 64, generator=gen(5))
    ref = x @ w.t() + b
    errs = {}
    for rank in (0, 2):
        mm = nn.Sequential(nn.Linear(64, 64))
        mm.load_state_dict({"0.weight": w, "0.bias": b})
        quantize(
            mm,
            recipe("w8a8", weight="int4", weight_granularity="tensor", lowrank=rank),
            calls,
            Plan([LayerPlan("0")]),
            progress=False,
        )
        errs[rank] = rel_err(mm(x), ref)
    assert errs[2] < errs[0] / 2, errs


# §11.2 item 31 / B5: the branch consumes unquantized activations -------------------------------------------------
@pytest.mark.parametrize("backend", ["reference", "cpu-onednn-int8", "int-mm"])
def test_item31_b5_branch_sees_unquantized_smoothed_input(backend):
    m = AdaLNToy()
    quantize(
        m,
        recipe("w8a8-smooth", seg=True, lowrank=4, search=False, activation_granularity="token", dynamic=True),
        adaln_calls(),
        adaln_plan(m),
        progress=False,
    )
    layer: SegLinear = m.linear
    layer.set_backend(get_backend(backend))
    x = torch.nn.functional.silu(torch.randn(8, 32, generator=gen(6)) * 3)
    outs, outs_wrong = [], []
    for seg in layer.segs:
        xs = x.double() / seg.smooth.double()
        xq = fake_quantize_activation(xs.float(), layer.cfg.activation).double()
        base = xq @ seg.dequantized_weight().double().t()
        outs.append(base + xs @ seg.lowrank_down.double() @ seg.lowrank_up.double())
        outs_wrong.append(base + xq @ seg.lowrank_down.double() @ seg.lowrank_up.double())
    want = torch.cat(outs, 1) + layer.bias.double()
    wrong = torch.cat(outs_wrong, 1) + layer.bias.double()
    got = layer(x)
    assert rel_err(got, want) < 2e-5
    assert rel_err(wrong, want) > 10 * rel_err(got, want)
