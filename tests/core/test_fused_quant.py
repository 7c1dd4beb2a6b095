"""The compiled one-pass activation quantizers (Inductor) that production uses: exactly the codes of the eager
reference, and every int8 backend path on compiled quantizers agrees with the same path on eager ones.

The rest of the suite runs with ``SEGQUANT_COMPILE=0`` (tests/conftest.py). This module turns compilation on for
all its tests and shares the compiled kernels between them (compiling is most of its run time), clearing the
kernel cache once before and once after, so no eager kernel cached by another module is mistaken for a compiled one.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from segquant_core import quantize, recipe
from segquant_core.backends import fused_quant, get_backend
from segquant_core.backends.reference import ReferenceBackend
from segquant_core.quantizers import ActivationSpec, encode_activation

from .conftest import SEG_LAYERS, SegToy, gen, rel_err, seg_calls, seg_plan

SPECS = [
    ActivationSpec("int8", "tensor", False, False),
    ActivationSpec("int8", "tensor", False, True),
    ActivationSpec("int8", "token", True, False),
    ActivationSpec("int8", "token", True, True),
    ActivationSpec("int8", "tensor", True, True),
]


@pytest.fixture(scope="module", autouse=True)
def _compilation_on() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SEGQUANT_COMPILE", "1")
        fused_quant._kernel.cache_clear()
        yield
        fused_quant._kernel.cache_clear()


def assert_compiled(flavour: str) -> None:
    """The kernel cached for ``flavour`` is a torch.compile wrapper and compilation never fell back to eager."""
    assert fused_quant.compile_enabled(), "compilation failed and fell back to eager"
    kernel = fused_quant._kernel(flavour)
    assert kernel is not fused_quant._FLAVOURS[flavour]
    assert getattr(kernel, "_torchdynamo_orig_callable", None) is fused_quant._FLAVOURS[flavour]


def flavour_of(spec: ActivationSpec) -> str:
    if not spec.dynamic:
        return "static_dual" if spec.dual else "static_single"
    return f"{spec.granularity.value}_{'dual' if spec.dual else 'single'}"


@pytest.fixture
def compiled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fused_quant, "EAGER_MAX_ELEMENTS", 0)  # these inputs are small: force the compiled path


@pytest.mark.parametrize(
    "spec",
    SPECS,
    ids=lambda s: f"{s.granularity.value}-{'dyn' if s.dynamic else 'static'}-{'dual' if s.dual else 'single'}",
)
def test_compiled_codes_match_reference(spec: ActivationSpec, compiled: None) -> None:
    torch.manual_seed(0)
    for rows in (37, 5):  # two shapes: compiled once with dynamic shapes
        x = torch.nn.functional.silu(torch.randn(rows, 48) * 4).to(torch.bfloat16)
        smooth = torch.rand(48) + 0.5
        xs = x.float() / smooth
        static = None
        if not spec.dynamic:
            static = torch.tensor([0.05, 0.002]) if spec.dual else torch.tensor([0.04])
        ref_codes, ref_scales = encode_activation(xs, spec, static)
        for unsigned, as_float in ((True, False), (False, False), (False, True)):
            codes, row = fused_quant.encode_rows(x, spec, static, smooth, unsigned=unsigned, as_float=as_float)
            expect = ref_codes.reshape(-1, 48).to(torch.int16) + (128 if unsigned else 0)
            assert codes.dtype == (torch.float32 if as_float else torch.uint8 if unsigned else torch.int8)
            assert torch.equal(codes.to(torch.int16), expect)
            want = ref_scales.expand(ref_codes.shape[0], rows, 1).reshape(-1, 1)
            if isinstance(row, float):
                assert row == pytest.approx(float(want[0]))
            else:
                assert torch.allclose(row, want)
    assert_compiled(flavour_of(spec))


def test_small_inputs_skip_the_compiled_region() -> None:
    # A few rows (AdaLN's M = batch) cost less eagerly than entering a compiled region; same codes either way.
    spec = SPECS[1]
    x = torch.randn(2, 48)
    static = torch.tensor([0.05, 0.002])
    before = fused_quant._kernel.cache_info()
    codes, _ = fused_quant.encode_rows(x, spec, static, None, unsigned=False)
    after = fused_quant._kernel.cache_info()
    assert (after.hits, after.misses) == (before.hits, before.misses)  # no compiled kernel was even looked up
    ref, _ = encode_activation(x, spec, static)
    assert torch.equal(codes, ref.reshape(-1, 48).to(torch.int8))


@pytest.mark.parametrize("eager", [True, False])
def test_encode_channels_matches_per_segment_encoding(monkeypatch: pytest.MonkeyPatch, eager: bool) -> None:
    monkeypatch.setattr(fused_quant, "EAGER_MAX_ELEMENTS", 1 << 30 if eager else 0)
    spec = SPECS[0]
    torch.manual_seed(1)
    x = (torch.randn(9, 48) * 3).to(torch.bfloat16)
    bounds = [(0, 16), (16, 40), (40, 48)]
    seg_scales = [0.02, 0.05, 0.011]
    smooth = torch.rand(48) + 0.5
    per_channel = torch.cat([torch.full((b - a,), s) for (a, b), s in zip(bounds, seg_scales)])
    codes = fused_quant.encode_channels(x, smooth, per_channel, unsigned=True)
    for (a, b), s in zip(bounds, seg_scales):
        seg, _ = fused_quant.encode_rows(x[:, a:b], spec, torch.tensor([s]), smooth[a:b], unsigned=True)
        assert torch.equal(codes[:, a:b], seg)
    if not eager:
        assert_compiled("static_single")


# The backend matrix with the compiled quantizers production uses ---------------------------------------------------
# The rest of the suite runs with SEGQUANT_COMPILE=0 and inputs below EAGER_MAX_ELEMENTS, so the CPU backends only
# ever see the eager quantizers there. Here every int8 backend path (oneDNN fused single/dual, in-segments in one
# pass, fbgemm, _int_mm, the int-mm backend) runs on compiled quantizers, with fp32 and bf16 inputs, and must give
# bit-identical outputs to the same path on eager quantizers and stay within 1e-3 of the reference backend.
BACKEND_PATHS = [
    ("cpu-onednn-int8", "onednn"),
    ("cpu-onednn-int8", "fbgemm"),
    ("cpu-onednn-int8", "int_mm"),
    ("int-mm", None),
]


def _quantized_toy(weight: str, dynamic: bool, dual: bool) -> SegToy:
    model = SegToy()
    r = recipe(
        "w8a8",
        weight=weight,
        weight_granularity="channel" if weight == "int4" else "tensor",
        activation="int8",
        activation_granularity="token" if dynamic else "tensor",
        dynamic=dynamic,
        dual=dual,
        smooth=True,
        seg=True,
        search=False,
        lowrank=0,
    )
    quantize(model, r, seg_calls(), seg_plan(dual=dual), backend="reference", progress=False)
    return model


@pytest.mark.parametrize("weight", ["int8", "int4"])
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("dual", [False, True], ids=["single", "dual"])
def test_backend_matrix_on_compiled_quantizers(
    monkeypatch: pytest.MonkeyPatch, weight: str, dynamic: bool, dual: bool
) -> None:
    model = _quantized_toy(weight, dynamic, dual)
    g = gen(100)
    for name in SEG_LAYERS:
        layer = getattr(model, name)
        for dtype in (torch.float32, torch.bfloat16):
            x = (torch.randn(48, layer.in_features, generator=g) * 2).to(dtype)
            x[0, 0] = 25.0  # beyond the calibrated range: clipping in the static case
            x_before = x.clone()
            layer.set_backend(ReferenceBackend())
            ref = layer(x).float()
            for backend, kernel in BACKEND_PATHS:
                if kernel is not None:
                    monkeypatch.setenv("SEGQUANT_CPU_GEMM", kernel)
                outs = {}
                for eager in (True, False):
                    monkeypatch.setattr(fused_quant, "EAGER_MAX_ELEMENTS", 1 << 30 if eager else 0)
                    layer.set_backend(get_backend(backend))
                    outs[eager] = layer(x)
                    assert torch.equal(x, x_before), f"{backend}/{kernel} wrote into its input"
                where = f"{name} {dtype} on {backend}/{kernel}"
                assert torch.equal(outs[False], outs[True]), f"{where}: compiled and eager quantizers disagree"
                assert rel_err(outs[False].float(), ref) < (1e-3 if dtype == torch.float32 else 1e-2), where
    spec = model.ff.cfg.activation
    assert spec is not None and (spec.dynamic, spec.dual) == (dynamic, dual)
    assert_compiled(flavour_of(spec))
