"""The compiled one-pass activation quantizers produce exactly the codes of the eager reference."""

from __future__ import annotations

import pytest
import torch

from segquant_core.backends import fused_quant
from segquant_core.quantizers import ActivationSpec, encode_activation

SPECS = [
    ActivationSpec("int8", "tensor", False, False),
    ActivationSpec("int8", "tensor", False, True),
    ActivationSpec("int8", "token", True, False),
    ActivationSpec("int8", "token", True, True),
    ActivationSpec("int8", "tensor", True, True),
]


@pytest.fixture
def compiled(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("SEGQUANT_COMPILE", "1")
    monkeypatch.setattr(fused_quant, "EAGER_MAX_ELEMENTS", 0)  # these inputs are small: force the compiled path
    fused_quant._kernel.cache_clear()
    yield
    fused_quant._kernel.cache_clear()


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.granularity.value}-{'dyn' if s.dynamic else 'static'}"
                         f"-{'dual' if s.dual else 'single'}")
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
    assert fused_quant.compile_enabled()
    assert fused_quant._kernel.cache_info().currsize >= 1  # the compiled kernel was used


def test_small_inputs_skip_the_compiled_region(monkeypatch: pytest.MonkeyPatch) -> None:
    # A few rows (AdaLN's M = batch) cost less eagerly than entering a compiled region; same codes either way.
    monkeypatch.setenv("SEGQUANT_COMPILE", "1")
    fused_quant._kernel.cache_clear()
    spec = SPECS[1]
    x = torch.randn(2, 48)
    static = torch.tensor([0.05, 0.002])
    codes, _ = fused_quant.encode_rows(x, spec, static, None, unsigned=False)
    assert fused_quant._kernel.cache_info().currsize == 0
    ref, _ = encode_activation(x, spec, static)
    assert torch.equal(codes, ref.reshape(-1, 48).to(torch.int8))


@pytest.mark.parametrize("eager", [True, False])
def test_encode_channels_matches_per_segment_encoding(monkeypatch: pytest.MonkeyPatch, eager: bool) -> None:
    monkeypatch.setenv("SEGQUANT_COMPILE", "1")
    monkeypatch.setattr(fused_quant, "EAGER_MAX_ELEMENTS", 1 << 30 if eager else 0)
    fused_quant._kernel.cache_clear()
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
    fused_quant._kernel.cache_clear()
