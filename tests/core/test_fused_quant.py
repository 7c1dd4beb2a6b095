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
        for unsigned in (True, False):
            codes, row = fused_quant.encode_rows(x, spec, static, smooth, unsigned=unsigned)
            expect = ref_codes.reshape(-1, 48).to(torch.int16) + (128 if unsigned else 0)
            assert codes.dtype == (torch.uint8 if unsigned else torch.int8)
            assert torch.equal(codes.to(torch.int16), expect)
            want = ref_scales.expand(ref_codes.shape[0], rows, 1).reshape(-1, 1)
            if isinstance(row, float):
                assert row == pytest.approx(float(want[0]))
            else:
                assert torch.allclose(row, want)
    assert fused_quant.compile_enabled()
