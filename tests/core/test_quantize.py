"""segquant_core.quantize: the pipeline invariants (§11.2 items 35–38), summary counts, error paths."""

from __future__ import annotations

import gc
import importlib
import weakref

import pytest
import torch
from torch import nn

from segquant_core import SegLinear, quantize, recipe
from segquant_core.backends import get_backend
from segquant_core.detect.plan import LayerPlan, Plan, Segments
from segquant_core.recipes import LayerOverride

from .conftest import SEG_LAYERS, SegToy, gen, rel_err, seg_calls, seg_plan

# ``segquant_core.quantize`` the attribute is the function; the module is what build_seglinear lives in.
quantize_mod = importlib.import_module("segquant_core.quantize")


def _float_state(model: nn.Module) -> dict[str, tuple[int, torch.Tensor]]:
    return {n: (p.data_ptr(), p.detach().clone()) for n, p in model.state_dict().items()}


def _assert_untouched(model: nn.Module, linears: dict[str, nn.Linear], state) -> None:
    assert all(model.get_submodule(n) is lin for n, lin in linears.items())
    assert not any(isinstance(m, SegLinear) for m in model.modules())
    now = model.state_dict()
    assert set(now) == set(state)
    for n, (ptr, value) in state.items():
        assert now[n].data_ptr() == ptr and torch.equal(now[n], value), n


# §11.2 item 37: the FP model is untouched until replacement ---------------------------------------------------------
def test_item37_invalid_plan_leaves_model_unchanged():
    m = SegToy()
    linears = {n: getattr(m, n) for n in SEG_LAYERS}
    state = _float_state(m)
    bad_plans = [
        (Plan([LayerPlan("ada", Segments("out", (32, 32, 31)))]), "sum to 95"),
        (Plan([LayerPlan("nope")]), "'nope' does not exist"),
        (Plan([LayerPlan("", None)]), "is a SegToy, not nn.Linear"),
        (Plan([LayerPlan("proj", Segments("in", (16, 16)))]), "input features"),
    ]
    for plan, msg in bad_plans:
        with pytest.raises(ValueError, match=msg):
            quantize(m, "w8a8-segquant", seg_calls(), plan, progress=False)
        _assert_untouched(m, linears, state)


def test_item37_layers_swapped_only_at_the_end(monkeypatch):
    m = SegToy()
    linears = {n: getattr(m, n) for n in SEG_LAYERS}
    state = _float_state(m)
    real_build = quantize_mod.build_seglinear
    seen = []

    def checking_build(name, linear, spec, stats):
        # while any layer is being built, every float linear is still in place and unchanged
        _assert_untouched(m, linears, state)
        assert linear is linears[name]
        seen.append(name)
        return real_build(name, linear, spec, stats)

    monkeypatch.setattr(quantize_mod, "build_seglinear", checking_build)
    quantize(m, "w8a8-segquant:lowrank=4,gptq=on", seg_calls(), seg_plan(), progress=False)
    assert seen == list(SEG_LAYERS)
    assert all(isinstance(getattr(m, n), SegLinear) for n in SEG_LAYERS)
    # the replaced float layers themselves were never written to
    for n, lin in linears.items():
        assert torch.equal(lin.weight, state[f"{n}.weight"][1])


def test_item37_failure_while_building_leaves_model_unchanged(monkeypatch):
    m = SegToy()
    linears = {n: getattr(m, n) for n in SEG_LAYERS}
    state = _float_state(m)
    real_build = quantize_mod.build_seglinear

    def failing_build(name, linear, spec, stats):
        if name == SEG_LAYERS[-1]:
            raise RuntimeError("boom")
        return real_build(name, linear, spec, stats)

    monkeypatch.setattr(quantize_mod, "build_seglinear", failing_build)
    with pytest.raises(RuntimeError, match="boom"):
        quantize(m, "w8a8-segquant", seg_calls(), seg_plan(), progress=False)
    _assert_untouched(m, linears, state)
    assert not hasattr(m, "segquant")
    assert all(not lin._forward_pre_hooks for lin in linears.values())  # observer hooks removed


def test_item37_impossible_backend_leaves_model_unchanged():
    m = SegToy()
    linears = {n: getattr(m, n) for n in SEG_LAYERS}
    state = _float_state(m)
    with pytest.raises(ValueError, match=r"int-mm.*activations are not int8"):
        quantize(m, recipe("w8a8", activation=None), seg_calls(), seg_plan(), backend="int-mm", progress=False)
    _assert_untouched(m, linears, state)
    # and it can be quantized afterwards
    quantize(m, "w8a8", seg_calls(), seg_plan(), progress=False)


# §11.2 item 38 (CPU stand-in for "peak memory with offload") ---------------------------------------------------------
def test_item38_no_second_copy_of_float_weights_kept_alive():
    # The reference keeps a private copy of every weight (≈2× peak memory). We check the CPU-observable part:
    # after quantize() nothing holds on to the replaced float nn.Linear weights — they are freed by gc.
    m = SegToy()
    refs = {n: (weakref.ref(getattr(m, n)), weakref.ref(getattr(m, n).weight)) for n in SEG_LAYERS}
    result = quantize(m, "w8a8-segquant:lowrank=4,gptq=on", seg_calls(), seg_plan(), progress=False)
    gc.collect()
    for n, (mod_ref, w_ref) in refs.items():
        assert mod_ref() is None, f"{n}: the float nn.Linear is still referenced"
        assert w_ref() is None, f"{n}: the float weight is still referenced"
    assert result.layers and m.segquant is result
    # the quantized layers hold no float weight-sized tensor of the original either
    for n in SEG_LAYERS:
        layer = getattr(m, n)
        assert all(
            t.dtype != torch.float32 or t.numel() < layer.in_features * layer.out_features
            for t in (s.weight for s in layer.segs)
        )


# §11.2 item 35: no in-place mutation of the caller's activations ------------------------------------------------------
class SharedInput(nn.Module):
    """One activation feeds three sibling linears and a residual (the to_q/to_k/to_v situation)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.norm = nn.LayerNorm(32)
        self.to_q, self.to_k, self.to_v = nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 32)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h = torch.nn.functional.gelu(self.norm(x))
        return h, self.to_q(h), self.to_k(h), self.to_v(h), h + 1


@pytest.mark.parametrize("spec", ["w8a8", "w8a8-segquant", "w4a8-segquant:lowrank=4", "fp8-segquant"])
def test_item35_no_inplace_mutation_of_activations(spec):
    calls = [{"x": torch.randn(4, 8, 32, generator=gen(1))}]
    plan = Plan([LayerPlan(n, Segments("in", (16, 16)), True) for n in ("to_q", "to_k", "to_v")])
    m = SharedInput()
    res = quantize(m, spec, calls, plan, progress=False)
    x = torch.randn(4, 8, 32, generator=gen(2))
    x_before = x.clone()
    backends = {"reference", *res.backends}
    for backend in sorted(backends):
        for n in ("to_q", "to_k", "to_v"):
            getattr(m, n).set_backend(get_backend(backend))
        with torch.no_grad():
            h, _q, k, _v, resid = m(x)
            h_float = torch.nn.functional.gelu(m.norm(x))
        assert torch.equal(x, x_before), backend
        assert torch.equal(h, h_float), backend  # the shared activation was not overwritten by any sibling
        assert torch.equal(resid, h_float + 1), backend
        # each sibling's output equals calling it alone on a fresh copy of the input
        assert torch.equal(k, m.to_k(h_float.clone())), backend


# §11.2 item 36 (integration): exclude / override by glob -------------------------------------------------------------
def test_item36_excluded_layers_stay_float_and_overrides_apply():
    m = SegToy()
    q_weight = m.q.weight.detach().clone()
    r = recipe(
        "w8a8-segquant",
        excludes=("q",),
        overrides=(
            LayerOverride.from_dict({"pattern": "f*", "weight": "int4", "weight_granularity": "channel"}),
            LayerOverride.from_dict({"pattern": "k", "exclude": True}),
        ),
    )
    res = quantize(m, r, seg_calls(), seg_plan(), progress=False)
    assert isinstance(m.q, nn.Linear) and not isinstance(m.q, SegLinear)
    assert isinstance(m.k, nn.Linear) and not isinstance(m.k, SegLinear)
    assert torch.equal(m.q.weight, q_weight)
    assert sorted(res.excluded) == ["k", "q"]
    assert set(res.layers) == {"ada", "proj", "ff"}
    assert m.ff.cfg.weight.fmt.value == "int4" and m.ada.cfg.weight.fmt.value == "int8"
    assert res.summary()["excluded_layers"] == 2


# summary / result -----------------------------------------------------------------------------------------------------
def test_summary_counts():
    m = SegToy()
    res = quantize(m, "w8a8-segquant", seg_calls(), seg_plan(dual=True), progress=False)
    s = res.summary()
    assert s["recipe"] == "w8a8-segquant"
    assert s["quantized_layers"] == 5 and s["excluded_layers"] == 0
    assert s["segmented_layers"] == 2  # ada (out) and proj (in)
    assert s["dual_scale_layers"] == 3  # ada, proj, ff
    assert s["formats"] == {"w:int8/tensor a:int8/tensor": 5}
    assert s["backends"] == {"cpu-onednn-int8": 5}
    n_float = sum(getattr(SegToy(), n).weight.numel() + getattr(SegToy(), n).bias.numel() for n in SEG_LAYERS)
    assert s["float_bytes"] == n_float * 4
    assert 0 < s["quantized_bytes"] < s["float_bytes"]
    m2 = SegToy()
    s2 = quantize(m2, "w4a8-segquant:dual=off,seg=off", seg_calls(), seg_plan(dual=True), progress=False).summary()
    assert s2["segmented_layers"] == 0 and s2["dual_scale_layers"] == 0
    assert s2["formats"] == {"w:int4/channel a:int8/token/dynamic": 5}


def test_quantized_model_stays_close_to_float():
    fp = SegToy()
    call = seg_calls(n=1, seed=9)[0]
    with torch.no_grad():
        ref = fp(**call)
    for spec, tol in (("w8a8", 0.05), ("w8a8-segquant", 0.05), ("w4a8-segquant", 0.15), ("fp8-segquant", 0.1)):
        m = SegToy()
        quantize(m, spec, seg_calls(n=4), seg_plan(), progress=False)
        with torch.no_grad():
            assert rel_err(m(**call), ref) < tol, spec


def test_quantize_error_paths_and_fp_recipe():
    m = SegToy()
    with pytest.raises(ValueError, match="at least one calibration call"):
        quantize(m, "w8a8", [], seg_plan(), progress=False)
    res = quantize(m, "fp", [], seg_plan(), progress=False)
    assert res.layers == {} and not any(isinstance(x, SegLinear) for x in m.modules())
    m.train()
    quantize(m, "w8a8", seg_calls(), seg_plan(), progress=False)
    assert m.training  # mode restored after calibration
    with pytest.raises(ValueError, match="already contains SegLinear"):
        quantize(m, "w8a8", seg_calls(), seg_plan(), progress=False)


def test_quantize_is_deterministic():
    outs = []
    call = seg_calls(n=1, seed=11)[0]
    for _ in range(2):
        m = SegToy()
        quantize(m, "w8a8-segquant:lowrank=4", seg_calls(n=3), seg_plan(), progress=False)
        with torch.no_grad():
            outs.append(m(**call))
    assert torch.equal(outs[0], outs[1])


class Branchy(nn.Module):
    """``unused`` never runs; ``extra`` only runs when the call has an ``extra`` input."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.extra_proj, self.unused = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        y = self.a(x)
        return y if extra is None else y + self.extra_proj(extra)


@pytest.mark.parametrize("spec", ["w8a8", "w8a8-segquant", "w4a8-segquant", "w8a8:gptq=on"])
def test_layers_without_calibration_input(spec, caplog):
    # Regression: a linear that no calibration call reaches used to crash quantize() with a TypeError; one that
    # only the held-out (odd-numbered) calls reach crashed the same way. The first stays float (reported as
    # excluded, with a warning), the second is calibrated on what it saw.
    g = gen(3)
    calls = [
        {"x": torch.randn(4, 16, generator=g)},
        {"x": torch.randn(4, 16, generator=g), "extra": torch.randn(4, 16, generator=g)},
    ]
    m = Branchy()
    with caplog.at_level("WARNING"):
        res = quantize(m, spec, calls, Plan(), progress=False)
    assert res.excluded == ["unused"] and "unused" in caplog.text
    assert type(m.unused) is nn.Linear
    assert isinstance(m.a, SegLinear) and isinstance(m.extra_proj, SegLinear)
    with torch.no_grad():
        y = m(**calls[1])
    assert torch.isfinite(y).all()
