"""SmoothQuant and the α search (§11.2 items 22–28, B1)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from segquant_core import SegLinear, quantize, recipe
from segquant_core.calibrate.smooth import S_MAX, S_MIN, smoothing_vector
from segquant_core.detect.plan import LayerPlan, Plan, Segments
from segquant_core.seglinear import SegLinearConfig

from .conftest import AdaLNToy, adaln_calls, adaln_plan, gen


# §11.2 item 22: the s formula, clamping, dead channels ---------------------------------------------------------
def test_item22_smoothing_formula():
    x = torch.tensor([4.0, 1.0, 9.0, 2.0])
    w = torch.tensor([1.0, 4.0, 0.25, 2.0])
    for alpha in (0.0, 0.3, 0.5, 1.0):
        s = smoothing_vector(x, w, alpha)
        expect = x.pow(alpha) / w.pow(1 - alpha)
        assert torch.allclose(s, expect, rtol=1e-6), alpha
    assert smoothing_vector(x, w, 0.5).tolist() == pytest.approx([2.0, 0.5, 6.0, 1.0])


def test_item22_clamping_and_dead_channels():
    x = torch.tensor([1e12, 1e-8, 0.0, 5.0, 3.0])
    w = torch.tensor([1.0, 1.0, 1.0, 0.0, 1e-12])
    s = smoothing_vector(x, w, 1.0)
    assert s[0].item() == S_MAX == 1e4  # clamped from 1e12
    assert s[1].item() == pytest.approx(S_MIN) and S_MIN == 1e-4  # clamped from 1e-8
    assert s[2].item() == 1.0  # no activation signal
    assert s[3].item() == S_MAX  # all-zero weight column: the formula's limit, clamped
    assert s[4].item() == S_MAX  # weight below 2^-31 counts as zero
    assert (s >= S_MIN).all() and (s <= S_MAX).all()
    assert smoothing_vector(torch.tensor([0.0, 2.0]), torch.tensor([0.0, 1.0]), 0.5)[0].item() == 1.0  # both dead
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        smoothing_vector(x, w, 1.5)


def test_zero_weight_column_never_sets_the_activation_range():
    # Issue 16 item 7: s_c = 1 for an all-zero weight column let a large activation in a channel that cannot
    # change the output set the activation scale. It now gets S_MAX, or more when even x_c / S_MAX would
    # exceed the live channels' largest smoothed activation.
    x = torch.tensor([2.0, 8.0, 1e3, 1e9])
    w = torch.tensor([0.5, 2.0, 0.0, 0.0])
    s = smoothing_vector(x, w, 0.5)
    assert torch.allclose(s[:2], (x[:2].sqrt() / w[:2].sqrt()), rtol=1e-6)  # live channels: the formula
    live_peak = float((x[:2] / s[:2]).max())
    assert s[2].item() == S_MAX  # 1e3 / 1e4 stays below the live peak
    assert s[3].item() == pytest.approx(1e9 / live_peak, rel=1e-6)  # raised beyond the clamp
    assert (x / s).max().item() == pytest.approx(live_peak, rel=1e-6)
    # every weight column zero: nothing to compare with, the clamp bound is used
    assert smoothing_vector(torch.tensor([3.0, 5.0]), torch.zeros(2), 0.5).tolist() == [S_MAX, S_MAX]


class _OneLinear(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(64, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


@pytest.mark.parametrize("outlier", [1.0, 100.0, 1e6])
@pytest.mark.parametrize("search", [False, True])
def test_zero_weight_column_outlier_does_not_hurt_the_smoothed_layer(outlier: float, search: bool) -> None:
    """A 64-channel layer whose column 5 is all zero, fed activations whose channel 5 is ``outlier`` times
    larger: the quantized output error stays that of the layer without the outlier (it was ≈ 0.98 before)."""
    g = gen(1)

    def batch() -> torch.Tensor:
        x = torch.randn(16, 64, generator=g)
        x[:, 5] *= outlier
        return x

    torch.manual_seed(0)
    model = _OneLinear()
    with torch.no_grad():
        model.lin.weight[:, 5] = 0.0
    calls = [{"x": batch()} for _ in range(4)]
    x_test = batch()
    want = model(x_test).detach()
    quantize(model, recipe("w8a8-smooth", search=search, alpha=0.5), calls, Plan([LayerPlan("lin")]), progress=False)
    err = float((model(x_test).detach() - want).norm() / want.norm())
    assert err < 0.05, err
    seg = model.lin.segs[0]
    assert seg.smooth[5].item() >= S_MAX
    assert float(seg.act_scale) < 0.1  # ≈ live range / 127, not outlier / 127


# §11.2 item 23: function preservation with quantization off ------------------------------------------------------
def test_item23_smoothing_preserves_the_function():
    g = gen(0)
    x = torch.randn(32, 24, generator=g, dtype=torch.float64) * torch.logspace(-2, 2, 24, dtype=torch.float64)
    w = torch.randn(16, 24, generator=g, dtype=torch.float64)
    s = smoothing_vector(x.abs().amax(0), w.abs().amax(0), 0.5).double()
    assert (s - 1).abs().max() > 1  # a non-trivial smoothing vector
    assert torch.allclose((x / s) @ (w * s).t(), x @ w.t(), rtol=1e-12, atol=1e-12)
    # ... and through a float SegLinear that divides by s on the fly (reference backend)
    lin = torch.nn.Linear(24, 16, bias=True).double()
    with torch.no_grad():
        lin.weight.copy_(w)
    cfg = SegLinearConfig(24, 16, Segments("out", (8, 8)), None, None, True, smooth=True)
    layer = SegLinear(cfg)
    for seg, (a, b) in zip(layer.segs, cfg.segments.bounds()):
        seg.weight = (w[a:b] * s).clone()
        seg.smooth = s.clone()
    layer.bias = lin.bias.detach().clone()
    assert torch.allclose(layer(x), F.linear(x, w, lin.bias), rtol=1e-10, atol=1e-10)


# §11.2 item 24: per-segment smoothing vectors in out-mode --------------------------------------------------------
def test_item24_per_segment_smoothing_vectors_differ():
    m = AdaLNToy()
    w = m.linear.weight.detach().clone()
    calls = adaln_calls()
    quantize(
        m,
        recipe("w8a8-smooth", seg=True, search=False, alpha=0.5, smooth_scope="segment"),
        calls,
        adaln_plan(m),
        progress=False,
    )
    layer: SegLinear = m.linear
    x_absmax = torch.stack([F.silu(c["emb"]).abs().amax(0) for c in calls]).amax(0)
    smooths = [seg.smooth for seg in layer.segs]
    for (a, b), s in zip(layer.cfg.segments.bounds(), smooths):
        assert s is not None and s.shape == (32,)
        assert torch.allclose(s, smoothing_vector(x_absmax, w[a:b].abs().amax(0), 0.5), rtol=1e-6)
    # chunks 0 (×0.05) and 3 (×2) have different weight ranges → different s
    assert not torch.allclose(smooths[0], smooths[3])
    assert (smooths[0] / smooths[3]).mean() > 3
    # every segment's activation scale is its own (the input is divided by a different s)
    assert len({float(seg.act_scale) for seg in layer.segs}) > 1


# §11.2 items 25–28 and B1: the α search ---------------------------------------------------------------------------
def _search(grid, smooth_recipe="w8a8-smooth", **kw):
    m = AdaLNToy()
    w = m.linear.weight.detach().clone()
    orig_weight = m.linear.weight
    kw.setdefault("smooth_scope", "segment")  # §11.2 specifies the search per segment
    r = recipe(smooth_recipe, seg=True, alpha_grid=tuple(grid), **kw)
    res = quantize(m, r, adaln_calls(), adaln_plan(m), progress=False)
    return res.layers["linear"], w, orig_weight


def test_item25_b1_every_grid_value_including_the_last_is_evaluated():
    grid = [round(0.1 * i, 1) for i in range(11)]  # 0, 0.1, … 1.0 — the reference skipped 1.0
    report, _, _ = _search(grid)
    assert len(report.segments) == 6
    for seg in report.segments:
        assert sorted(seg.errors) == grid
        assert 1.0 in seg.errors and 0.0 in seg.errors
        assert all(e == e and e >= 0 for e in seg.errors.values())  # every candidate actually scored (no NaN)


def test_item25_b1_five_point_grid_both_ends():
    report, _, _ = _search((0.0, 0.25, 0.5, 0.75, 1.0))
    for seg in report.segments:
        assert list(seg.errors) == [0.0, 0.25, 0.5, 0.75, 1.0]


def test_item26_selected_alpha_minimises_recorded_error():
    report, _, _ = _search((0.0, 0.25, 0.5, 0.75, 1.0))
    chosen = [seg.alpha for seg in report.segments]
    for seg in report.segments:
        assert seg.alpha == min(seg.errors, key=seg.errors.get)
        assert seg.errors[seg.alpha] == min(seg.errors.values())
    assert all(a is not None for a in chosen)


def test_item26_errors_differ_between_candidates():
    # the search has something to choose between: the candidates do not all score the same
    report, _, _ = _search((0.0, 0.5, 1.0))
    for seg in report.segments:
        assert max(seg.errors.values()) > 1.01 * min(seg.errors.values())


def test_item27_b1_one_point_grid_works():
    report, _, _ = _search((0.3,))
    for seg in report.segments:
        assert seg.alpha == 0.3
        assert list(seg.errors) == [0.3]
    # search=off uses the fixed α (a one-point grid too)
    report, _, _ = _search((0.0, 1.0), search=False, alpha=0.7)
    assert [seg.alpha for seg in report.segments] == [0.7] * 6


def test_item28_original_weights_unchanged_after_search():
    m = AdaLNToy()
    w_param = m.linear.weight
    b_param = m.linear.bias
    w_before = w_param.detach().clone()
    b_before = b_param.detach().clone()
    ptr = w_param.data_ptr()
    quantize(m, recipe("w8a8-segquant", lowrank=4, gptq=True), adaln_calls(), adaln_plan(m, dual=True), progress=False)
    assert isinstance(m.linear, SegLinear)
    # the float layer that was replaced was only read: every candidate started from the same weights
    assert torch.equal(w_param, w_before) and torch.equal(b_param, b_before)
    assert w_param.data_ptr() == ptr


def test_no_smoothing_means_no_alpha_and_no_vector():
    m = AdaLNToy()
    res = quantize(m, recipe("w8a8", seg=True), adaln_calls(), adaln_plan(m), progress=False)
    assert all(seg.alpha is None and seg.errors == {} for seg in res.layers["linear"].segments)
    assert all(seg.smooth is None for seg in m.linear.segs)


def test_alpha_search_scores_on_held_out_data_without_leaking_it():
    # Regression: the smoothing vector of each candidate used to come from maxima that included the held-out
    # rows, so α = 1 (every channel normalised to exactly its observed max) never clipped while scoring and
    # won almost everywhere — then clipped unseen inputs badly. With few calibration calls the searched
    # recipe must track the best fixed α, and stay far from the overfitting α = 1.
    from .conftest import SegToy, rel_err, seg_calls, seg_plan

    fp = SegToy()
    tests = seg_calls(n=3, seed=9)

    def err(grid):
        m = SegToy()
        quantize(m, recipe("w8a8-smooth", alpha_grid=grid), seg_calls(n=8), seg_plan(), progress=False)
        with torch.no_grad():
            return sum(rel_err(m(**c), fp(**c)) for c in tests) / len(tests)

    searched = err((0.0, 0.25, 0.5, 0.75, 1.0))
    e0, e1 = err((0.0,)), err((1.0,))
    assert searched <= 1.3 * min(e0, e1), (searched, e0, e1)
    assert searched < 0.5 * e1, (searched, e1)


def test_layer_smooth_scope_shares_alpha_and_smoothing_vector_and_runs_as_one_gemm():
    from segquant_core.backends.grouping import plan_gemms

    grid = (0.0, 0.25, 0.5, 0.75, 1.0)
    m = AdaLNToy()
    w = m.linear.weight.detach().clone()
    calls = adaln_calls()
    res = quantize(
        m,
        recipe("w8a8-segquant", smooth_scope="layer", alpha_grid=grid),
        calls,
        adaln_plan(m, dual=True),
        progress=False,
    )
    report = res.layers["linear"]
    layer: SegLinear = m.linear
    alphas = {seg.alpha for seg in report.segments}
    assert len(alphas) == 1
    alpha = alphas.pop()
    sizes = [32] * 6  # AdaLNToy: six equal chunks of d = 32
    total = {a: sum(seg.errors[a] * n for seg, n in zip(report.segments, sizes)) for a in grid}
    assert alpha == min(total, key=total.get)
    # one smoothing vector, built from the whole weight's column maxima
    x_absmax = torch.stack([F.silu(c["emb"]).abs().amax(0) for c in calls]).amax(0)
    expect = smoothing_vector(x_absmax, w.abs().amax(0), alpha)
    for seg in layer.segs:
        assert torch.allclose(seg.smooth, expect, rtol=1e-6)
        assert torch.equal(seg.smooth, layer.segs[0].smooth) and torch.equal(seg.act_scale, layer.segs[0].act_scale)
    # ... but each chunk keeps its own weight scale (chunks 0 and 3 differ 40x in range)
    assert len({float(seg.weight_scale) for seg in layer.segs}) == 6
    # the same quantized input for every chunk: the real backend runs the layer as one GEMM
    assert len(plan_gemms(layer)) == 1
    assert len(plan_gemms(quantize_segment_scope())) == 6


def quantize_segment_scope() -> SegLinear:
    m = AdaLNToy()
    quantize(
        m, recipe("w8a8-segquant", smooth_scope="segment"), adaln_calls(), adaln_plan(m, dual=True), progress=False
    )
    return m.linear


def test_choose_alphas_weighs_segments_by_size():
    from segquant_core.calibrate.build import _choose_alphas

    errors = [{0.0: 1.0, 0.5: 2.0}, {0.0: 3.0, 0.5: 1.0}]
    assert _choose_alphas(errors, (10, 10), "segment") == [0.0, 0.5]
    assert _choose_alphas(errors, (10, 10), "layer") == [0.5, 0.5]  # totals 40 vs 30
    assert _choose_alphas(errors, (100, 10), "layer") == [0.0, 0.0]  # totals 130 vs 210
    nan = float("nan")
    assert _choose_alphas([{0.0: nan, 0.5: nan}] * 2, (4, 4), "layer") == [0.0, 0.0]  # nothing scored: first


def test_smooth_scope_switch_parses_and_rejects_unknown_values():
    assert recipe("w8a8-segquant:smooth_scope=segment").smooth_scope == "segment"
    assert recipe("w8a8-segquant").smooth_scope == "layer"
    with pytest.raises(ValueError, match="smooth_scope"):
        recipe("w8a8-segquant:smooth_scope=block")
