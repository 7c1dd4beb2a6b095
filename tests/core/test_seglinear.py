"""segquant_core.seglinear: out/in segmentation, bias, ragged segments, block-wise weights (§11.2 items 10–13, B2)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from segquant_core import SegLinear, quantize, recipe
from segquant_core.backends import get_backend
from segquant_core.backends.reference import ReferenceBackend
from segquant_core.detect.plan import LayerPlan, Plan, Segments
from segquant_core.quantizers import ActivationSpec, WeightSpec
from segquant_core.seglinear import SegLinearConfig

from .conftest import AdaLNToy, adaln_calls, adaln_plan, gen, rel_err


# §11.2 item 10: identity quantizers reproduce F.linear -----------------------------------------------------
@pytest.mark.parametrize(
    "segments",
    [
        Segments("out", (16, 16, 16)),
        Segments("out", (8, 32, 8)),  # ragged
        Segments("in", (12, 48)),  # ragged
        Segments("in", (20, 20, 20)),
    ],
)
def test_item10_unquantized_segments_reproduce_f_linear_float64(segments):
    lin = nn.Linear(60, 48).double()
    with torch.no_grad():  # weights that fp32 cannot represent exactly: a float32 detour would show
        lin.weight.copy_(torch.randn(48, 60, dtype=torch.float64, generator=gen(0)) / 7)
        lin.bias.copy_(torch.randn(48, dtype=torch.float64, generator=gen(2)) / 3)
    x = torch.randn(3, 7, 60, dtype=torch.float64, generator=gen(1))
    layer = SegLinear.unquantized(lin, segments)
    y = layer(x)
    ref = F.linear(x, lin.weight, lin.bias)
    assert y.dtype == torch.float64 and y.shape == (3, 7, 48)
    assert torch.allclose(y, ref, rtol=1e-12, atol=1e-12)


def test_item10_single_segment_unquantized_is_exactly_f_linear():
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        lin = nn.Linear(24, 10).to(dtype)
        x = torch.randn(5, 24).to(dtype)
        assert torch.equal(SegLinear.unquantized(lin)(x), F.linear(x, lin.weight, lin.bias))


@pytest.mark.parametrize("axis,sizes", [("out", (4, 4, 4)), ("in", (8, 8, 8))])
def test_item10_bias_added_exactly_once(axis, sizes):
    lin = nn.Linear(24, 12)
    with torch.no_grad():
        lin.weight.zero_()
        lin.bias.fill_(100.0)
    layer = SegLinear.unquantized(lin, Segments(axis, sizes))
    y = layer(torch.randn(3, 24))
    assert torch.equal(y, torch.full((3, 12), 100.0))
    # bias stays a single vector, not one per segment
    assert layer.bias.shape == (12,)


def _hand_output(m: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """The quantized layer's output, recomputed by hand from its buffers (bias once)."""
    layer: SegLinear = m[0]
    outs = []
    for seg, xk in zip(layer.segs, layer.segment_inputs(x)):
        outs.append(xk @ seg.dequantized_weight().t())
    y = torch.cat(outs, 1) if layer.cfg.segments.axis == "out" else sum(outs)
    return y + layer.bias


def test_item10_quantized_bias_once_matches_hand_computation():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(24, 12))
    with torch.no_grad():
        m[0].bias.fill_(50.0)
    calls = [{"input": torch.randn(64, 24, generator=gen(2))}]
    recipe_ = recipe("w8a8", activation=None, seg=True)  # weight-only: the hand computation is exact
    quantize(m, recipe_, calls, Plan([LayerPlan("0", Segments("in", (8, 8, 8)))]), progress=False)
    x = torch.randn(4, 24, generator=gen(3))
    assert torch.allclose(m(x), _hand_output(m, x), rtol=1e-5, atol=1e-4)


# §11.2 item 11: out-mode per-tensor weights == block-wise quantization ---------------------------------------
def _blockwise(w: torch.Tensor, bounds, axis: str) -> torch.Tensor:
    out = torch.empty_like(w)
    for a, b in bounds:
        blk = w[a:b] if axis == "out" else w[:, a:b]
        scale = blk.abs().max() / 127
        q = torch.clamp(torch.round(blk / scale), -128, 127) * scale
        if axis == "out":
            out[a:b] = q
        else:
            out[:, a:b] = q
    return out


def test_item11_out_segments_equal_blockwise_weight_quantization():
    m = AdaLNToy()
    w = m.linear.weight.detach().clone()
    quantize(m, recipe("w8a8", seg=True), adaln_calls(), adaln_plan(m), progress=False)
    layer: SegLinear = m.linear
    bounds = layer.cfg.segments.bounds()
    assert len(bounds) == 6
    expect = _blockwise(w, bounds, "out")
    got = layer.dequantized_weight()
    assert torch.allclose(got, expect, rtol=0, atol=1e-7)
    # each block has its own per-tensor scale (one scale per segment)
    scales = [float(s.weight_scale) for s in layer.segs]
    assert scales == pytest.approx([float(w[a:b].abs().max() / 127) for a, b in bounds])
    assert max(scales) / min(scales) > 10  # the chunks really differ in magnitude


def test_item11_in_segments_equal_column_blockwise_weight_quantization():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(60, 16))
    with torch.no_grad():
        m[0].weight[:, 12:] *= 20
    w = m[0].weight.detach().clone()
    calls = [{"input": torch.randn(32, 60, generator=gen(4))}]
    quantize(m, recipe("w8a8", seg=True), calls, Plan([LayerPlan("0", Segments("in", (12, 48)))]), progress=False)
    layer: SegLinear = m[0]
    assert [tuple(s.weight.shape) for s in layer.segs] == [(16, 12), (16, 48)]
    assert torch.allclose(layer.dequantized_weight(), _blockwise(w, [(0, 12), (12, 60)], "in"), rtol=0, atol=1e-6)


# §11.2 item 12: AdaLN toy ---------------------------------------------------------------------------------
def test_item12_adaln_small_chunks_error_drops_with_segments():
    emb = torch.randn(64, 32, generator=gen(5)) * 3
    fp = AdaLNToy()
    with torch.no_grad():
        ref = fp.chunks(emb)
    errs = {}
    for spec in ("w8a8", "w8a8:seg=on"):
        m = AdaLNToy()
        quantize(m, spec, adaln_calls(), adaln_plan(m), progress=False)
        with torch.no_grad():
            errs[spec] = [rel_err(a, b) for a, b in zip(m.chunks(emb), ref)]
    small = [0, 1, 4]  # the 0.05-scaled chunks
    for k in small:
        assert errs["w8a8"][k] > 0.08, errs  # one per-tensor scale leaves ~3 levels for the small chunks
        assert errs["w8a8:seg=on"][k] < 0.03, errs
        assert errs["w8a8"][k] > 5 * errs["w8a8:seg=on"][k]
    # the largest chunk (2.0) does not get worse
    assert errs["w8a8:seg=on"][3] <= errs["w8a8"][3] * 1.2


# §11.2 item 13: ragged / remainder segments work, bad sizes fail loudly -------------------------------------
def test_item13_ragged_in_segments_quantized_match_reference_and_real():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(60, 24))
    calls = [{"input": torch.randn(32, 60, generator=gen(6))}]
    plan = Plan([LayerPlan("0", Segments("in", (12, 48)))])
    quantize(m, recipe("w8a8", seg=True), calls, plan, progress=False)
    layer: SegLinear = m[0]
    x = torch.randn(5, 60, generator=gen(7))
    y_real = layer(x)
    layer.set_backend(ReferenceBackend())
    y_ref = layer(x)
    assert y_ref.shape == (5, 24)
    assert rel_err(y_real, y_ref) < 1e-3
    assert len(layer.segs[0].act_scale) == 1 and layer.segs[0].act_scale != layer.segs[1].act_scale


def test_item13_remainder_out_segments():
    torch.manual_seed(0)
    lin = nn.Linear(16, 40)
    x = torch.randn(3, 16)
    layer = SegLinear.unquantized(lin, Segments("out", (16, 16, 8)))  # split(16) with a remainder of 8
    assert torch.allclose(layer(x), lin(x), atol=1e-6)
    m = nn.Sequential(lin)
    quantize(
        m,
        recipe("w8a8", seg=True),
        [{"input": torch.randn(8, 16, generator=gen(8))}],
        Plan([LayerPlan("0", Segments("out", (16, 16, 8)))]),
        progress=False,
    )
    assert [s.weight.shape[0] for s in m[0].segs] == [16, 16, 8]
    assert m[0](x).shape == (3, 40)


def test_item13_wrong_sizes_raise_value_error():
    lin = nn.Linear(60, 24)
    with pytest.raises(ValueError, match="sum to 50"):
        SegLinear.unquantized(lin, Segments("in", (12, 38)))
    with pytest.raises(ValueError, match="output features"):
        SegLinear.unquantized(lin, Segments("out", (12, 8)))
    with pytest.raises(ValueError, match="positive"):
        Segments("in", (12, 0))
    with pytest.raises(ValueError, match="axis"):
        Segments("rows", (12,))
    layer = SegLinear.unquantized(lin, Segments("in", (12, 48)))
    with pytest.raises(ValueError, match="60 input features, got 59"):
        layer(torch.randn(2, 59))
    # quantize() checks the plan against the model before touching anything
    m = nn.Sequential(nn.Linear(60, 24))
    with pytest.raises(ValueError, match="sum to 61"):
        quantize(
            m,
            "w8a8:seg=on",
            [{"input": torch.randn(4, 60)}],
            Plan([LayerPlan("0", Segments("in", (13, 48)))]),
            progress=False,
        )
    # int4 weights need an even K per segment
    cfg = SegLinearConfig(60, 24, Segments("in", (13, 47)), None, None, True)
    SegLinear(cfg)  # float: fine
    from segquant_core.quantizers import WeightSpec

    with pytest.raises(ValueError, match="even"):
        SegLinear(SegLinearConfig(60, 24, Segments("in", (13, 47)), WeightSpec("int4", "channel"), None, True))
    with pytest.raises(ValueError, match="even"):
        quantize(
            nn.Sequential(nn.Linear(60, 24)),
            recipe("w8a8", weight="int4", weight_granularity="channel", seg=True),
            [{"input": torch.randn(4, 60)}],
            Plan([LayerPlan("0", Segments("in", (13, 47)))]),
            progress=False,
        )


# B2: stack → linear (equal in-segments) ---------------------------------------------------------------------
class StackToy(nn.Module):
    """Three parts of very different range, ``torch.stack``ed and flattened into one linear."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.parts = nn.ModuleList(nn.Linear(16, 16) for _ in range(3))
        with torch.no_grad():
            for p, s in zip(self.parts, (0.02, 1.0, 20.0)):
                p.weight *= s
                p.bias *= s
        self.out = nn.Linear(48, 16)
        with torch.no_grad():  # every part contributes about equally to the output
            for k, s in enumerate((0.02, 1.0, 20.0)):
                self.out.weight[:, 16 * k : 16 * (k + 1)] /= s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.stack([p(x) for p in self.parts], dim=-2)  # [..., 3, 16]
        return self.out(h.flatten(-2))


def test_b2_stack_to_linear_in_segments_work():
    calls = [{"x": torch.randn(32, 16, generator=gen(9))}, {"x": torch.randn(32, 16, generator=gen(10))}]
    x = torch.randn(16, 16, generator=gen(11))
    fp = StackToy()
    with torch.no_grad():
        ref_parts = torch.stack([p(x) for p in fp.parts], dim=-2).flatten(-2)
        ref = fp.out(ref_parts)
    errs = {}
    for seg in (False, True):
        m = StackToy()
        plan = Plan([LayerPlan("out", Segments("in", (16, 16, 16)) if seg else None)])
        quantize(m, recipe("w8a8", seg=True), calls, plan, progress=False, backend="reference")
        assert isinstance(m.out, SegLinear)
        assert len(m.out.segs) == (3 if seg else 1)
        with torch.no_grad():
            # only quantize the stacked linear's effect: feed it the float parts
            errs[seg] = rel_err(m.out(ref_parts), ref)
            if seg:
                scales = [float(s.act_scale) for s in m.out.segs]
                assert scales[2] > 100 * scales[0]  # one activation scale per stacked part
                for name in ("cpu-onednn-int8", "int-mm"):
                    m.out.set_backend(get_backend(name))
                    assert rel_err(m.out(ref_parts), ref) == pytest.approx(errs[True], rel=1e-3)
    assert errs[True] < 0.03 and errs[True] < errs[False] / 10, errs


def test_forward_never_writes_into_input():
    m = AdaLNToy()
    quantize(m, "w8a8:seg=on,dual=on", adaln_calls(), adaln_plan(m, dual=True), progress=False)
    x = torch.nn.functional.silu(torch.randn(4, 32, generator=gen(12)) * 3)
    before = x.clone()
    for name in ("reference", "cpu-onednn-int8", "int-mm"):
        m.linear.set_backend(get_backend(name))
        m.linear(x)
        assert torch.equal(x, before), name


# per-segment DualScale in the layer config ---------------------------------------------------------------------
def _config(segments: Segments, dual: bool, dual_segments=None) -> SegLinearConfig:
    return SegLinearConfig(
        96, 16, segments, WeightSpec("int8"), ActivationSpec("int8", dual=dual), True, dual_segments=dual_segments
    )


def test_per_segment_dual_config_gives_each_segment_its_quantizer_and_scales():
    cfg = _config(Segments("in", (32, 64)), True, (False, True))
    layer = SegLinear(cfg)
    assert [s.activation.dual for s in layer.segs] == [False, True]
    assert [tuple(s.act_scale.shape) for s in layer.segs] == [(1,), (2,)]  # static: one step, or two for ±
    assert SegLinearConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.to_dict()["dual_segments"] == [False, True]


def test_configs_written_before_per_segment_dual_read_as_all_segments():
    """A config without ``dual_segments`` (every checkpoint written before) keeps the per-layer meaning."""
    cfg = _config(Segments("in", (32, 64)), True)
    old = cfg.to_dict()
    assert "dual_segments" not in old
    layer = SegLinear(SegLinearConfig.from_dict(old))
    assert [s.activation.dual for s in layer.segs] == [True, True]
    assert [s.act_scale.numel() for s in layer.segs] == [2, 2]


def test_uniform_dual_flags_collapse_and_bad_ones_are_refused():
    assert _config(Segments("in", (32, 64)), True, (True, True)).dual_segments is None
    none = _config(Segments("in", (32, 64)), True, (False, False))
    assert none.dual_segments is None and not none.activation.dual
    with pytest.raises(ValueError, match="out-segments all read the same input"):
        SegLinearConfig(
            32,
            96,
            Segments("out", (32, 64)),
            WeightSpec("int8"),
            ActivationSpec("int8", dual=True),
            True,
            dual_segments=(False, True),
        )
    with pytest.raises(ValueError, match="3 flags for 2 segments"):
        _config(Segments("in", (32, 64)), True, (False, True, True))
    with pytest.raises(ValueError, match="needs a DualScale activation spec"):
        _config(Segments("in", (32, 64)), False, (False, True))
