"""segquant_core.backends: every real CPU backend agrees with the reference backend (§11.2 items 35, 40-on-CPU;
B3, B4, B5), automatic backend selection, refusal reasons, small M and bf16 inputs."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from segquant_core import SegLinear, quantize, recipe
from segquant_core.backends import _REGISTRY, assign_backends, backend_names, get_backend, select_backend
from segquant_core.backends.reference import ReferenceBackend
from segquant_core.detect.plan import LayerPlan, Plan
from segquant_core.quantizers import fake_quantize_activation

from .conftest import (
    SEG_LAYERS,
    SINGLE_STREAM_DUAL,
    SegToy,
    SingleStreamToy,
    gen,
    rel_err,
    seg_calls,
    seg_plan,
    single_stream_calls,
    single_stream_plan,
)

INT_BACKENDS = ["cpu-onednn-int8", "int-mm"]
FP8_BACKENDS = ["scaled-mm-fp8"]

WEIGHTS = {  # name → (recipe fields, backends that must accept the layer)
    "int8": (dict(weight="int8", weight_granularity="tensor", activation="int8"), INT_BACKENDS),
    "int4": (dict(weight="int4", weight_granularity="channel", activation="int8"), INT_BACKENDS),
    "fp8": (dict(weight="fp8_e4m3", weight_granularity="tensor", activation="fp8_e4m3"), FP8_BACKENDS),
}
ACTS = {
    "static-tensor": dict(activation_granularity="tensor", dynamic=False),
    "dynamic-token": dict(activation_granularity="token", dynamic=True),
}


def make_recipe(wfmt: str, act: str, dual: bool, smooth: bool, lowrank: int, **extra):
    return recipe(
        "w8a8",
        **WEIGHTS[wfmt][0],
        **ACTS[act],
        dual=dual,
        smooth=smooth,
        lowrank=lowrank,
        seg=True,
        search=False,
        **extra,
    )


def real_backends_for(layer: SegLinear) -> list[str]:
    """Every registered non-reference backend that is available here and accepts ``layer``."""
    return [
        name
        for name, cls in _REGISTRY.items()
        if name != "reference" and cls.available() and cls().unsupported_reason(layer) is None
    ]


def quantized_toy(wfmt: str, act: str, dual: bool, smooth: bool, lowrank: int, backend: str = "auto") -> SegToy:
    m = SegToy()
    quantize(
        m,
        make_recipe(wfmt, act, dual, smooth, lowrank),
        seg_calls(),
        seg_plan(dual=dual),
        progress=False,
        backend=backend,
    )
    return m


# §11.2 item 40 (CPU kernels) + B3 + B4: real vs reference across the whole matrix ---------------------------------
@pytest.mark.parametrize(
    "wfmt,act,dual,smooth,lowrank", list(itertools.product(WEIGHTS, ACTS, [False, True], [False, True], [0, 4]))
)
def test_item40_real_backends_match_reference(wfmt, act, dual, smooth, lowrank):
    m = quantized_toy(wfmt, act, dual, smooth, lowrank)
    layers = {name: getattr(m, name) for name in SEG_LAYERS}
    assert all(isinstance(layer, SegLinear) for layer in layers.values())
    assert [layers["ada"].cfg.segments.axis, layers["proj"].cfg.segments.axis] == ["out", "in"]
    assert len(layers["ff"].segs) == 1
    assert layers["ada"].cfg.activation.dual is dual
    assert layers["ff"].cfg.lowrank_rank == lowrank
    g = gen(100)
    for name, layer in layers.items():
        x = torch.randn(2, 5, layer.in_features, generator=g) * 2
        x[0, 0, 0] = 25.0  # beyond the calibrated range: exercises clipping in the static case
        x_before = x.clone()
        layer.set_backend(ReferenceBackend())
        ref = layer(x)
        assert torch.equal(x, x_before)  # B4 (reference)
        backends = real_backends_for(layer)
        assert set(WEIGHTS[wfmt][1]) <= set(backends), backends  # the CPU backends made for this format take it
        for backend in backends:
            layer.set_backend(get_backend(backend))
            y = layer(x)
            assert y.shape == ref.shape == (2, 5, layer.out_features)
            assert torch.equal(x, x_before), f"{backend} wrote into its input"  # B4
            err = rel_err(y, ref)
            assert err < 1e-3, f"{name} on {backend}: rel err {err:.2e}"


# per-segment DualScale: a ragged in-segmented layer whose second segment alone is dual (Flux single-stream) ---------
def single_stream_toy(wfmt: str, act: str, smooth: bool, lowrank: int, dual: bool = True) -> SingleStreamToy:
    m = SingleStreamToy()
    quantize(
        m,
        make_recipe(wfmt, act, dual, smooth, lowrank),
        single_stream_calls(),
        single_stream_plan(),
        progress=False,
        backend="reference",
    )
    return m


def single_stream_input(m: SingleStreamToy, seed: int, rows: int = 10) -> torch.Tensor:
    """What ``proj_out`` reads in the toy's own forward (attention-like part | GELU-MLP part)."""
    x = torch.randn(rows, m.d, generator=gen(seed))
    with torch.no_grad():
        return torch.cat([m.attn(x), torch.nn.functional.gelu(m.mlp(x), approximate="tanh")], dim=-1)


def _segmentwise_reference(layer: SegLinear, x: torch.Tensor) -> torch.Tensor:
    """Σ_k Q_k(x_k / s_k) · Ŵ_kᵀ (+ low-rank) + b, each segment with its own activation quantizer."""
    y = layer.bias.double().expand(x.shape[0], -1).clone()
    for seg, (a, b) in zip(layer.segs, layer.cfg.segments.bounds()):
        xs = x[:, a:b] / seg.smooth if seg.smooth is not None else x[:, a:b]
        xq = fake_quantize_activation(xs, seg.activation, seg.act_scale).double()
        y += xq @ seg.dequantized_weight().double().t()
        if seg.lowrank_down is not None:
            y += (xs.double() @ seg.lowrank_down.double()) @ seg.lowrank_up.double()
    return y


@pytest.mark.parametrize("wfmt,act,smooth,lowrank", list(itertools.product(WEIGHTS, ACTS, [False, True], [0, 4])))
def test_per_segment_dual_real_backends_match_reference(wfmt, act, smooth, lowrank):
    m = single_stream_toy(wfmt, act, smooth, lowrank)
    layer = m.proj_out
    assert layer.cfg.segments.sizes == (m.d, 2 * m.d) and layer.cfg.dual_segments == SINGLE_STREAM_DUAL
    assert [s.activation.dual for s in layer.segs] == [False, True]
    if act == "static-tensor":
        assert [s.act_scale.numel() for s in layer.segs] == [1, 2]
    x = single_stream_input(m, 5)
    x[0, 0] = 40.0  # beyond the calibrated range of the attention segment: clipping in the static case
    x_before = x.clone()
    layer.set_backend(ReferenceBackend())
    ref = layer(x)
    assert rel_err(ref, _segmentwise_reference(layer, x)) < 1e-6
    backends = real_backends_for(layer)
    assert set(WEIGHTS[wfmt][1]) <= set(backends), backends
    for backend in backends:
        layer.set_backend(get_backend(backend))
        y = layer(x)
        assert torch.equal(x, x_before), f"{backend} wrote into its input"
        err = rel_err(y, ref)
        assert err < 1e-3, f"{backend}: rel err {err:.2e}"


@pytest.mark.parametrize("rows", [2, 48])
def test_cpu_int8_kernels_agree_on_per_segment_dual(monkeypatch, rows):
    """fbgemm, oneDNN and _int_mm on the mixed layer give the same integer GEMMs; the default rule too."""
    from segquant_core.backends import cpu_onednn

    if not cpu_onednn.fbgemm_available():
        pytest.skip("no fbgemm in this torch build")
    m = single_stream_toy("int8", "static-tensor", smooth=True, lowrank=0)
    layer = m.proj_out
    x = single_stream_input(m, 3, rows)
    outs = {}
    for kernel in ("fbgemm", "onednn", "int_mm", "autotune", "rule"):
        monkeypatch.setenv("SEGQUANT_CPU_GEMM", kernel)
        layer.set_backend(get_backend("cpu-onednn-int8"))
        outs[kernel] = layer(x)
        assert rel_err(outs[kernel], outs["fbgemm"]) < 1e-6, kernel
    layer.set_backend(ReferenceBackend())
    assert rel_err(outs["rule"], layer(x)) < 1e-3


def test_per_segment_dual_lowers_the_error_of_the_gelu_segment():
    """On the toy's own activations, DualScale on the GELU-MLP segment alone quantizes that segment's input
    better than one scale (the GELU's negative tail gets its own step), and leaves the attention segment's
    quantizer exactly as it was."""
    act_err, attn_scale = {}, {}
    for dual in (False, True):
        m = single_stream_toy("int8", "static-tensor", smooth=False, lowrank=0, dual=dual)
        layer = m.proj_out
        assert layer.cfg.dual_segments == (SINGLE_STREAM_DUAL if dual else None)
        mlp = single_stream_input(m, 11, rows=64)[:, m.d :]
        seg = layer.segs[1]
        act_err[dual] = rel_err(fake_quantize_activation(mlp, seg.activation, seg.act_scale), mlp)
        attn_scale[dual] = layer.segs[0].act_scale
    assert act_err[True] < 0.8 * act_err[False], act_err
    assert torch.equal(attn_scale[True], attn_scale[False])


def test_b3_dynamic_activations_run_on_real_cpu_backends():
    for wfmt, backend in (
        ("int8", "cpu-onednn-int8"),
        ("int8", "int-mm"),
        ("int4", "cpu-onednn-int8"),
        ("int4", "int-mm"),
        ("fp8", "scaled-mm-fp8"),
    ):
        m = quantized_toy(wfmt, "dynamic-token", dual=True, smooth=True, lowrank=0, backend=backend)
        assert m.segquant.backends == {backend: len(SEG_LAYERS)}
        call = seg_calls(n=1, seed=7)[0]
        y = m(**call)
        assert torch.isfinite(y).all()
        assert m.ff.segs[0].act_scale is None  # dynamic: no stored activation scale
        # dynamic per-token scales follow the input: scaling one token up does not change the others' outputs
        x = torch.randn(3, m.d, generator=gen(5))
        y1 = m.ff(x)
        x2 = x.clone()
        x2[0] *= 1000
        y2 = m.ff(x2)
        assert torch.allclose(y1[1:], y2[1:], rtol=1e-6, atol=1e-6)


# B5: the low-rank branch sees the unquantized (smoothed) activations in every backend ---------------------------
class LowRankToy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(32, 32)
        with torch.no_grad():  # a strongly low-rank weight: the branch carries most of the output
            u = torch.randn(32, 4)
            v = torch.randn(4, 32)
            self.lin.weight.copy_(u @ v / 4 + 0.01 * torch.randn(32, 32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


def _analytic(layer: SegLinear, x: torch.Tensor, quantized_branch: bool = False) -> torch.Tensor:
    """float64 ``Q(x/s)·Qw(W s)ᵀ + (x/s)·down·up + b`` straight from the layer's buffers."""
    seg = layer.segs[0]
    xs = x.double() / seg.smooth.double() if seg.smooth is not None else x.double()
    xq = fake_quantize_activation(xs.float(), layer.cfg.activation, seg.act_scale).double()
    branch_in = xq if quantized_branch else xs
    y = xq @ seg.dequantized_weight().double().t() + (branch_in @ seg.lowrank_down.double()) @ seg.lowrank_up.double()
    return y + layer.bias.double()


@pytest.mark.parametrize(
    "wfmt,backends", [("int8", ["reference", *INT_BACKENDS]), ("fp8", ["reference", *FP8_BACKENDS])]
)
@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("smooth", [False, True])
def test_b5_lowrank_branch_uses_unquantized_activations(wfmt, backends, act, smooth):
    m = LowRankToy()
    calls = [{"x": torch.randn(64, 32, generator=gen(1))}]
    r = make_recipe(wfmt, act, dual=False, smooth=smooth, lowrank=4)
    quantize(m, r, calls, Plan([LayerPlan("lin")]), progress=False)
    layer: SegLinear = m.lin
    assert layer.cfg.lowrank_rank == 4
    x = torch.randn(16, 32, generator=gen(2))
    want = _analytic(layer, x)
    wrong = _analytic(layer, x, quantized_branch=True)
    assert rel_err(wrong, want) > 3e-4  # the test can tell the two apart
    for name in backends:
        layer.set_backend(get_backend(name))
        got = layer(x)
        assert rel_err(got, want) < 2e-5, name
        assert rel_err(got, wrong) > 1e-4, name


# selection --------------------------------------------------------------------------------------------------
def test_select_backend_auto_choices():
    m = quantized_toy("int8", "static-tensor", dual=True, smooth=False, lowrank=0)
    assert m.segquant.backends == {"cpu-onednn-int8": len(SEG_LAYERS)}
    assert select_backend(m.ada).name == "cpu-onednn-int8"
    m4 = quantized_toy("int4", "dynamic-token", dual=False, smooth=False, lowrank=0)
    assert select_backend(m4.proj).name == "cpu-onednn-int8"
    m8 = quantized_toy("fp8", "static-tensor", dual=False, smooth=False, lowrank=0)
    assert select_backend(m8.ff).name == "scaled-mm-fp8"
    assert m8.segquant.backends == {"scaled-mm-fp8": len(SEG_LAYERS)}
    # weight-only int8: no real backend takes it, the reference does
    wo = SegToy()
    res = quantize(wo, recipe("w8a8", activation=None), seg_calls(), seg_plan(), progress=False)
    assert res.backends == {"reference": len(SEG_LAYERS)}
    assert select_backend(wo.q).name == "reference"
    assert wo.q.cfg.activation is None
    # assign_backends with an explicit preference re-targets every layer
    assert assign_backends(m, "int-mm") == {"int-mm": len(SEG_LAYERS)}
    assert all(getattr(m, n).backend.name == "int-mm" for n in SEG_LAYERS)


def test_backend_refusals_name_the_reason():
    m = quantized_toy("int8", "static-tensor", dual=False, smooth=False, lowrank=0)
    with pytest.raises(ValueError, match=r"scaled-mm-fp8.*weights are not fp8"):
        select_backend(m.ff, "scaled-mm-fp8")
    with pytest.raises(ValueError, match="weights are not fp8"):
        m.ff.set_backend(get_backend("scaled-mm-fp8"))
    wo = SegToy()
    quantize(wo, recipe("w8a8", activation=None), seg_calls(), seg_plan(), progress=False)
    for name in ("int-mm", "cpu-onednn-int8"):
        with pytest.raises(ValueError, match="activations are not int8"):
            wo.ff.set_backend(get_backend(name))
    with pytest.raises(ValueError, match=r"unknown backend 'cuda-magic'.*reference"):
        get_backend("cuda-magic")
    with pytest.raises(ValueError, match="cannot run"):
        quantize(SegToy(), recipe("w8a8", activation=None), seg_calls(), seg_plan(), backend="int-mm", progress=False)
    assert {"cpu-onednn-int8", "int-mm", "scaled-mm-fp8", "reference", "auto"} <= set(backend_names())


@pytest.mark.parametrize(
    "wfmt,act",
    [
        ("int8", "static-tensor"),
        ("int8", "dynamic-token"),
        ("int4", "dynamic-token"),
        ("fp8", "static-tensor"),
        ("fp8", "dynamic-token"),
    ],
)
def test_small_m_and_1d_inputs(wfmt, act):
    m = quantized_toy(wfmt, act, dual=True, smooth=True, lowrank=0)
    for name in SEG_LAYERS:
        layer = getattr(m, name)
        for rows in (1, 2):
            x = torch.randn(rows, layer.in_features, generator=gen(rows))
            layer.set_backend(ReferenceBackend())
            ref = layer(x)
            ref1d = layer(x[0])
            for backend in WEIGHTS[wfmt][1]:
                layer.set_backend(get_backend(backend))
                assert rel_err(layer(x), ref) < 1e-3, (name, rows, backend)
                y1 = layer(x[0])
                assert y1.shape == (layer.out_features,)
                assert rel_err(y1, ref1d) < 1e-3


@pytest.mark.parametrize(
    "wfmt,backend",
    [
        ("int8", "reference"),
        ("int8", "cpu-onednn-int8"),
        ("int8", "int-mm"),
        ("int4", "cpu-onednn-int8"),
        ("fp8", "scaled-mm-fp8"),
    ],
)
def test_bf16_inputs_give_bf16_outputs(wfmt, backend):
    m = quantized_toy(wfmt, "dynamic-token", dual=True, smooth=True, lowrank=4, backend=backend)
    for name in SEG_LAYERS:
        layer = getattr(m, name)
        x = torch.randn(4, layer.in_features, generator=gen(3)).to(torch.bfloat16)
        before = x.clone()
        y = layer(x)
        assert y.dtype == torch.bfloat16
        assert torch.equal(x, before)
        assert rel_err(y.float(), layer(x.float())) < 1e-2
    # the whole model runs in bf16 too
    call = {k: v.to(torch.bfloat16) for k, v in seg_calls(n=1)[0].items()}
    assert m(**call).dtype == torch.bfloat16


# §11.2 item 9 at the layer level ------------------------------------------------------------------------------
@pytest.mark.parametrize("act", list(ACTS))
def test_item09_all_positive_layer_input_dual_equals_single(act):
    class ReluLinear(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.lin = nn.Linear(32, 24)

        def forward(self, x):
            return self.lin(torch.relu(x))

    calls = [{"x": torch.randn(32, 32, generator=gen(1)) * 3}]
    layers = {}
    for dual in (False, True):
        m = ReluLinear()
        quantize(
            m,
            make_recipe("int8", act, dual=dual, smooth=False, lowrank=0),
            calls,
            Plan([LayerPlan("lin", None, dual)]),
            progress=False,
        )
        assert m.lin.cfg.activation.dual is dual
        layers[dual] = m.lin
    if act == "static-tensor":
        assert layers[True].segs[0].act_scale[0] == layers[False].segs[0].act_scale[0]
    x = torch.relu(torch.randn(8, 32, generator=gen(2)) * 3)
    for name in ("reference", *INT_BACKENDS):
        ys = {}
        for dual, layer in layers.items():
            layer.set_backend(get_backend(name))
            ys[dual] = layer(x)
        if name == "reference":
            assert torch.equal(ys[True], ys[False])
        else:
            assert rel_err(ys[True], ys[False]) < 1e-6, name


# The CPU int8 backend's three kernels (oneDNN, _int_mm, fbgemm) compute the same integer GEMM ----------------------
@pytest.mark.parametrize("layer_name", SEG_LAYERS)
@pytest.mark.parametrize("dual", [False, True])
@pytest.mark.parametrize("rows", [2, 48])
def test_cpu_int8_kernels_agree_and_the_rule_is_deterministic(monkeypatch, layer_name, dual, rows):
    """Every kernel, and oneDNN's fused paths (one call, DualScale as two calls, in-segments accumulated in
    place), against the generic per-group path on _int_mm and against the reference."""
    from segquant_core.backends import cpu_onednn

    if not cpu_onednn.fbgemm_available():
        pytest.skip("no fbgemm in this torch build")
    monkeypatch.setattr(cpu_onednn, "IN_SEGMENT_ROWS", 16)  # 48 rows: the in-segment path runs in 3 row blocks
    m = quantized_toy("int8", "static-tensor", dual=dual, smooth=True, lowrank=0, backend="cpu-onednn-int8")
    layer = getattr(m, layer_name)
    x = torch.randn(rows, layer.in_features, generator=gen(3)) * 2
    outs = {}
    for kernel in ("fbgemm", "onednn", "int_mm"):
        monkeypatch.setenv("SEGQUANT_CPU_GEMM", kernel)
        layer.set_backend(get_backend("cpu-onednn-int8"))  # fresh packing per kernel
        outs[kernel] = layer(x)
        for xb in (x.bfloat16(),):  # bf16 inputs may come back in bf16 straight from the kernel
            yb = layer(xb)
            assert yb.dtype == torch.bfloat16 and rel_err(yb.float(), outs[kernel]) < 1e-2
    # fbgemm and the generic _int_mm path scale the same exact int32 sums by the same fp32 factors
    assert rel_err(outs["fbgemm"], outs["int_mm"]) < 1e-6
    assert rel_err(outs["onednn"], outs["int_mm"]) < 1e-6
    layer.set_backend(ReferenceBackend())
    assert rel_err(outs["onednn"], layer(x)) < 1e-3
    # the default rule: fbgemm for small M, else oneDNN
    monkeypatch.setenv("SEGQUANT_CPU_GEMM", "rule")
    layer.set_backend(get_backend("cpu-onednn-int8"))
    expect = "fbgemm" if rows <= cpu_onednn.SMALL_M else "onednn"
    assert torch.equal(layer(x), outs[expect])
