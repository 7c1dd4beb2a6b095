"""The reference implementation's bugs B1–B9 (SEGQUANT.md §10.1), each shown absent here where it applies.

Most have a fuller test next to the module they concern (named in each docstring); these are the one-stop
regression checks.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from segquant_core import SegLinear, quantize, recipe
from segquant_core.backends import get_backend
from segquant_core.calibrate.lowrank import cap_rank
from segquant_core.detect.plan import LayerPlan, Plan, Segments
from segquant_core.quantizers import ActivationSpec, fake_quantize_activation

from .conftest import SEG_LAYERS, AdaLNToy, SegToy, adaln_calls, adaln_plan, gen, rel_err, seg_calls, seg_plan

BACKENDS = {
    "int8": ["reference", "cpu-onednn-int8", "int-mm"],
    "int4": ["reference", "cpu-onednn-int8", "int-mm"],
    "fp8": ["reference", "scaled-mm-fp8"],
}
FIELDS = {
    "int8": dict(weight="int8", activation="int8"),
    "int4": dict(weight="int4", weight_granularity="channel", activation="int8"),
    "fp8": dict(weight="fp8_e4m3", activation="fp8_e4m3"),
}


def test_b1_alpha_search_evaluates_every_grid_value_and_one_point_grids_work():
    """B1 (see test_smooth items 25–27): the last grid value was skipped; a one-value grid crashed."""
    for grid in ((0.0, 0.25, 0.5, 0.75, 1.0), tuple(round(0.1 * i, 1) for i in range(11)), (1.0,), (0.4,)):
        m = AdaLNToy()
        res = quantize(
            m, recipe("w8a8-smooth", seg=True, alpha_grid=grid), adaln_calls(), adaln_plan(m), progress=False
        )
        for seg in res.layers["linear"].segments:
            assert tuple(seg.errors) == grid  # every value, in order, the last included
            assert seg.alpha in grid
            if len(grid) > 1:
                assert all(e == e for e in seg.errors.values())  # all actually scored
                assert seg.errors[seg.alpha] == min(seg.errors.values())


def test_b2_stack_to_linear_in_segments_work():
    """B2 (see test_seglinear): stack→linear was dead code. Equal and ragged in-segments both run on every backend."""

    class Stack(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.heads = nn.ModuleList(nn.Linear(16, 16) for _ in range(4))
            self.out = nn.Linear(64, 16)

        def forward(self, x):
            return self.out(torch.stack([h(x) for h in self.heads], dim=1).flatten(1))

    calls = [{"x": torch.randn(16, 16, generator=gen(1))}]
    for sizes in ((16, 16, 16, 16), (16, 48), (8, 24, 32)):
        m = Stack()
        quantize(m, "w8a8:seg=on,dual=on", calls, Plan([LayerPlan("out", Segments("in", sizes), True)]), progress=False)
        assert [s.weight.shape[1] for s in m.out.segs] == list(sizes)
        x = torch.randn(5, 64, generator=gen(2))
        m.out.set_backend(get_backend("reference"))
        ref = m.out(x)
        for name in BACKENDS["int8"][1:]:
            m.out.set_backend(get_backend(name))
            assert rel_err(m.out(x), ref) < 1e-3


def test_b3_dynamic_activations_on_real_cpu_backends():
    """B3 (see test_backends): real kernels + dynamic activations called a method that did not exist."""
    for wfmt, gran in itertools.product(("int8", "int4"), ("tensor", "token")):
        m = SegToy()
        r = recipe("w8a8", **FIELDS[wfmt], activation_granularity=gran, dynamic=True, seg=True, dual=True)
        quantize(m, r, seg_calls(), seg_plan(), progress=False)
        for name in SEG_LAYERS:
            layer: SegLinear = getattr(m, name)
            assert layer.cfg.activation.dynamic and layer.segs[0].act_scale is None
            x = torch.randn(6, layer.in_features, generator=gen(3))
            layer.set_backend(get_backend("reference"))
            ref = layer(x)
            for backend in ("cpu-onednn-int8", "int-mm"):
                layer.set_backend(get_backend(backend))
                assert rel_err(layer(x), ref) < 1e-3, (wfmt, gran, name, backend)


def test_b4_caller_input_never_modified():
    """B4 (see test_backends / test_quantize item 35): the fake path overwrote the caller's activation in place."""
    for wfmt, dual, dynamic in itertools.product(FIELDS, (False, True), (False, True)):
        m = SegToy()
        act = dict(activation_granularity="token", dynamic=True) if dynamic else {}
        r = recipe("w8a8", **FIELDS[wfmt], **act, seg=True, dual=dual, smooth=True, lowrank=2, search=False)
        quantize(m, r, seg_calls(), seg_plan(dual=dual), progress=False)
        for name in SEG_LAYERS:  # out-segments (ada), in-segments (proj), single (q, k, ff)
            layer = getattr(m, name)
            x = torch.randn(3, layer.in_features, generator=gen(4))
            before = x.clone()
            for backend in BACKENDS[wfmt]:
                layer.set_backend(get_backend(backend))
                layer(x)
                layer(x.to(torch.bfloat16))
                assert torch.equal(x, before), (wfmt, dual, dynamic, name, backend)


def test_b5_lowrank_branch_sees_unquantized_activations():
    """B5 (see test_backends / test_lowrank item 31): fake mode fed quantized activations to the branch."""
    for wfmt in ("int8", "fp8"):
        m = nn.Sequential(nn.Linear(32, 32))
        quantize(
            m,
            recipe("w8a8", **FIELDS[wfmt], lowrank=8, activation_granularity="token", dynamic=True),
            [{"input": torch.randn(32, 32, generator=gen(5))}],
            Plan([LayerPlan("0")]),
            progress=False,
        )
        layer: SegLinear = m[0]
        seg = layer.segs[0]
        x = torch.randn(8, 32, generator=gen(6))
        xq = fake_quantize_activation(x, layer.cfg.activation).double()
        base = xq @ seg.dequantized_weight().double().t() + layer.bias.double()
        down, up = seg.lowrank_down.double(), seg.lowrank_up.double()
        want = base + x.double() @ down @ up
        wrong = base + xq @ down @ up
        for backend in BACKENDS[wfmt]:
            layer.set_backend(get_backend(backend))
            y = layer(x)
            assert rel_err(y, want) < 2e-5 and rel_err(y, wrong) > 10 * rel_err(y, want), (wfmt, backend)


def test_b6_rank_capped_below_segment_dim():
    """B6 (see test_lowrank item 30): r ≥ segment size made the residual 0 (a silently float layer)."""
    assert cap_rank(64, 64, 3072) == 63 and cap_rank(64, 3072, 64) == 63 and cap_rank(32, 64, 64) == 32
    m = nn.Sequential(nn.Linear(64, 64))
    res = quantize(
        m,
        "w8a8:lowrank=64,seg=on",
        [{"input": torch.randn(16, 64, generator=gen(7))}],
        Plan([LayerPlan("0", Segments("in", (16, 16, 32)))]),
        progress=False,
    )
    assert res.layers["0"].rank_capped and res.layers["0"].lowrank_rank == 15
    for seg in m[0].segs:
        assert seg.lowrank_down.shape[1] == 15 < min(seg.weight.shape)
        assert seg.quantized_weight().codes().abs().sum() > 0


def test_b7_static_per_token_activations_rejected():
    """B7: static per-token scales were tied to the calibration batch size and sequence length."""
    with pytest.raises(ValueError, match="dynamic"):
        ActivationSpec("int4", "token", dynamic=False)
    with pytest.raises(ValueError, match="dynamic"):
        recipe("w8a8", activation_granularity="token")
    with pytest.raises(ValueError, match="dynamic"):
        recipe("w4a8-segquant", dynamic=False)


def test_b8_every_recipe_switch_combination_constructs_and_runs():
    """B8 (see test_recipes): an ablation config (search on, no grid) raised KeyError."""
    for spec in (
        "w8a8-segquant:dual=off",
        "w8a8-segquant:search=off",
        "w8a8-smooth:search=on",
        "w8a8-segquant:seg=off,dual=on",
        "fp8-segquant:smooth=on,gptq=on,lowrank=4",
        "w4a8-segquant:search=off,alpha=1",
        "w8a8:smooth=off,search=on,dual=on",
    ):
        r = recipe(spec)
        m = SegToy()
        res = quantize(m, r, seg_calls(), seg_plan(), progress=False)
        assert set(res.layers) == set(SEG_LAYERS), spec
    for name, switch, value in itertools.product(
        ("fp", "w8a8", "w8a8-smooth", "w8a8-segquant", "w4a8-segquant", "fp8-segquant"),
        ("seg", "dual", "smooth", "gptq", "search"),
        ("on", "off"),
    ):
        r = recipe(f"{name}:{switch}={value}")
        r.resolve("blk.linear", LayerPlan("blk.linear", Segments("out", (4, 4)), True))
        json.dumps(r.to_dict())


def test_b9_import_needs_no_cuda_and_no_service_dependencies():
    """B9: the reference package could not even be imported without CUDA and JIT-built extensions."""
    code = textwrap.dedent("""
        import sys
        import segquant_core
        from segquant_core import quantize, recipe, save, load, SegLinear
        import torch
        heavy = [m for m in ("fastapi", "redis", "uvicorn", "starlette", "pydantic_settings", "service")
                 if m in sys.modules]
        assert not heavy, heavy
        assert not torch.cuda.is_initialized()
        print("ok", segquant_core.__version__)
    """)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok ")


def test_b11_quantize_does_not_mutate_its_inputs():
    """B11 (part): the reference's quantize() mutated its default config dict."""
    r = recipe("w8a8-segquant")
    before = json.dumps(r.to_dict())
    plan = seg_plan()
    plan_before = plan.to_json()
    calls = seg_calls()
    calls_before = [{k: v.clone() for k, v in c.items()} for c in calls]
    quantize(SegToy(), r, calls, plan, progress=False)
    assert json.dumps(r.to_dict()) == before and json.dumps(recipe("w8a8-segquant").to_dict()) == before
    assert plan.to_json() == plan_before
    assert all(torch.equal(c[k], cb[k]) for c, cb in zip(calls, calls_before) for k in c)
