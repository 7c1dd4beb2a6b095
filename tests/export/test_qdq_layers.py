"""The QDQ form of every SegLinear kind, on a toy model whose layers cover them all in one export:
out-segments with their own smoothing (one branch each), out-segments sharing one quantizer (one MatMul,
per-channel scales), in-segments with DualScale and a low-rank pair, int4 weights (INT4 at opset 21, int8
below), fp8, dynamic activations (refused unless asked for), the TorchScript exporter, and the clean-up rules.

The first test uses the default (dynamo) exporter; the others use the TorchScript one, whose float graph is the
same here and which exports this toy 10× faster (the QDQ rewrite after it is shared)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from export_helpers import assert_plan_counts, ort_output, reference_output, rel
from onnx import TensorProto, numpy_helper
from torch import nn

import segquant_core as sq
from segquant_core.detect.plan import LayerPlan, Plan, Segments
from segquant_core.export.exporter import export_onnx
from segquant_core.export.onnx_qdq import QDQExportError
from segquant_core.recipes import LayerOverride, Recipe


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(32, 48)
        self.b = nn.Linear(48, 32)
        self.c = nn.Linear(32, 32, bias=False)
        self.d = nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.a(x))
        h = self.b(h)
        h = F.silu(self.c(h))
        return self.d(h)


PLAN = Plan(
    [
        LayerPlan("a", Segments("out", (16, 32)), False),
        LayerPlan("b", Segments("in", (16, 16, 16)), True),
        LayerPlan("c", Segments("out", (8, 24)), True),
        LayerPlan("d", None, True),
    ]
)

BASE = Recipe(
    "toy",
    smooth=True,
    seg=True,
    dual=True,
    overrides=(
        LayerOverride.from_dict({"pattern": "a", "smooth_scope": "segment"}),
        LayerOverride.from_dict({"pattern": "b", "lowrank": 4}),
        LayerOverride.from_dict({"pattern": "c", "smooth": False, "weight_granularity": "channel"}),
        LayerOverride.from_dict({"pattern": "d", "weight": "int4", "weight_granularity": "channel"}),
    ),
)


def _toy(recipe: Recipe = BASE) -> tuple[Toy, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = Toy().eval()
    x = torch.randn(2, 5, 32) * 2
    calls = [{"x": torch.randn(2, 5, 32) * 2} for _ in range(2)]
    sq.quantize(model, recipe, calls, plan=PLAN, rows_per_layer=64, progress=False)
    return model, {"x": x}


@pytest.fixture(scope="module")
def toy() -> tuple[Toy, dict[str, torch.Tensor]]:
    return _toy()


def _init(proto: onnx.ModelProto, name: str) -> TensorProto:
    return next(t for t in proto.graph.initializer if t.name == name)


def test_every_seglinear_kind_has_the_planned_qdq_form(toy, tmp_path: Path) -> None:
    model, kwargs = toy
    out = tmp_path / "toy.onnx"
    result = export_onnx(model, kwargs, out)
    assert result.opset == 21  # int4 weights ask for opset 21
    proto = assert_plan_counts(model, out)
    rep = result.layers
    # a: out-segments, each with its own smoothing vector (smooth_scope=segment) → two branches, concatenated
    assert (rep["a"].groups, rep["a"].parts) == (2, 1)
    assert [n.op_type for n in proto.graph.node if n.name == "a/concat"] == ["Concat"]
    # b: in-segments + DualScale + low-rank: Split, 3 × (Relu/Min → 2 Q/DQ → 2 MatMul), Sum
    assert (rep["b"].groups, rep["b"].parts, rep["b"].quantize_linear, rep["b"].matmuls) == (3, 2, 6, 6 + 6)
    split = next(n for n in proto.graph.node if n.name == "b/split")
    assert numpy_helper.to_array(_init(proto, split.input[1])).tolist() == [16, 16, 16]
    assert sum(n.op_type == "Relu" for n in proto.graph.node if n.name.startswith("b/")) == 3
    assert sum(n.op_type == "Min" for n in proto.graph.node if n.name.startswith("b/")) == 3
    # c: no smoothing → both out-segments see the same quantized input: one MatMul, per-channel scales
    assert (rep["c"].groups, rep["c"].weight_dequantize) == (1, 1)
    wdq = next(n for n in proto.graph.node if n.name == "c/seg0-1/weight_dq")
    assert {a.name: a.i for a in wdq.attribute}["axis"] == 1
    scale = numpy_helper.to_array(_init(proto, wdq.input[1]))
    want = torch.cat([s.weight_scale for s in model.c.segs]).numpy()
    np.testing.assert_array_equal(scale, want)
    assert _init(proto, wdq.input[0]).dims == [32, 32]  # stored [K, N]
    # d: int4 per-channel weights as an INT4 initializer
    assert _init(proto, "d.seg0.weight_q").data_type == TensorProto.INT4
    # the activation scales are the calibrated ones, bit for bit
    pos = numpy_helper.to_array(_init(proto, "b.seg1.act_scale_pos"))
    assert float(pos) == float(model.b.segs[1].act_scale[0])
    err = rel(ort_output(out, kwargs), reference_output(model, kwargs))
    assert err < 1e-5, err


def test_int4_weights_are_int8_codes_below_opset_21(toy, tmp_path: Path) -> None:
    model, kwargs = toy
    result = export_onnx(model, kwargs, tmp_path / "toy18.onnx", opset=18, exporter="torchscript")
    assert any("int4 weights stored as int8" in n for n in result.notes)
    proto = assert_plan_counts(model, tmp_path / "toy18.onnx")
    w = _init(proto, "d.seg0.weight_q")
    assert w.data_type == TensorProto.INT8
    codes = numpy_helper.to_array(w)
    assert codes.min() >= -8 and codes.max() <= 7
    np.testing.assert_array_equal(codes.T, model.d.segs[0].quantized_weight().codes().numpy())
    assert rel(ort_output(tmp_path / "toy18.onnx", kwargs), reference_output(model, kwargs)) < 1e-5


def test_torchscript_exporter_gives_the_same_graph_structure(toy, tmp_path: Path) -> None:
    model, kwargs = toy
    out = tmp_path / "ts.onnx"
    result = export_onnx(model, kwargs, out, exporter="torchscript")
    assert result.opset == 20  # the legacy exporter's ceiling: int4 stays int8
    assert_plan_counts(model, out)
    assert rel(ort_output(out, kwargs), reference_output(model, kwargs)) < 1e-5


def test_fp8_exports_at_opset_19_and_matches(tmp_path: Path) -> None:
    model, kwargs = _toy(sq.recipe("fp8-segquant"))
    out = tmp_path / "fp8.onnx"
    result = export_onnx(model, kwargs, out, exporter="torchscript")
    assert result.opset == 19
    proto = assert_plan_counts(model, out)
    assert _init(proto, "d.seg0.weight_q").data_type == TensorProto.FLOAT8E4M3FN
    assert result.layers["a"].groups == 1  # no smoothing in fp8-segquant: the out-segments share one MatMul
    # positive DualScale branch is Max(x, 0) for fp8 (ONNX Runtime drops a Relu before an fp8 Q)
    assert any(n.op_type == "Max" for n in proto.graph.node if n.name.startswith("b/"))
    assert rel(ort_output(out, kwargs), reference_output(model, kwargs)) < 1e-5
    with pytest.raises(QDQExportError, match="fp8 weights need opset ≥ 19"):
        export_onnx(model, kwargs, tmp_path / "fp8-18.onnx", opset=18, exporter="torchscript")


DYNAMIC = Recipe("dyn", activation_granularity="token", dynamic=True, smooth=True, seg=True, dual=True)


def test_dynamic_activations_fail_readably_and_leave_nothing(tmp_path: Path) -> None:
    model, kwargs = _toy(DYNAMIC)
    out = tmp_path / "dyn.onnx"
    with pytest.raises(QDQExportError) as info:
        export_onnx(model, kwargs, out, exporter="torchscript")
    msg = str(info.value)
    assert "'a'" in msg and "dynamically" in msg and "per token" in msg
    assert list(tmp_path.iterdir()) == []
    # opt-in: in-graph scales (ReduceMax → runtime-scale Q/DQ) that ONNX Runtime runs exactly
    result = export_onnx(model, kwargs, out, allow_dynamic=True, exporter="torchscript")
    assert any("ONNX Runtime only" in n for n in result.notes)
    assert_plan_counts(model, out)
    assert rel(ort_output(out, kwargs), reference_output(model, kwargs)) < 1e-5


def test_model_is_restored_and_failed_write_leaves_nothing(
    toy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, kwargs = toy
    before = {n: id(m) for n, m in model.named_modules()}
    with torch.no_grad():
        y0 = model(**kwargs)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(onnx, "save_model", broken)
    with pytest.raises(OSError, match="disk full"):
        export_onnx(model, kwargs, tmp_path / "x.onnx", exporter="torchscript")
    assert list(tmp_path.iterdir()) == []
    assert {n: id(m) for n, m in model.named_modules()} == before
    with torch.no_grad():
        assert torch.equal(model(**kwargs), y0)


class Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shared(F.gelu(self.shared(x)))


def test_a_layer_called_twice_shares_its_weights(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Twice().eval()
    x = torch.randn(3, 16)
    sq.quantize(
        model,
        "w8a8-segquant",
        [{"x": x}],
        plan=Plan([LayerPlan("shared", None, True)]),
        rows_per_layer=32,
        progress=False,
    )
    out = tmp_path / "twice.onnx"
    result = export_onnx(model, {"x": x}, out, exporter="torchscript")
    rep = result.layers["shared"]
    assert (rep.calls, rep.quantize_linear, rep.weight_dequantize) == (2, 4, 2)
    proto = onnx.load(str(out))
    assert sum(t.name == "shared.seg0.weight_q" for t in proto.graph.initializer) == 1
    assert rel(ort_output(out, {"x": x}), reference_output(model, {"x": x})) < 1e-5


def test_large_graphs_go_to_external_data(toy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from segquant_core.export import exporter

    monkeypatch.setattr(exporter, "_PROTO_LIMIT", 1000)  # pretend the toy is above protobuf's 2 GB cap
    model, kwargs = toy
    out = tmp_path / "big.onnx"
    result = export_onnx(model, kwargs, out, exporter="torchscript")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data"]
    assert result.bytes == out.stat().st_size + (tmp_path / "big.onnx.data").stat().st_size
    assert rel(ort_output(out, kwargs), reference_output(model, kwargs)) < 1e-5
