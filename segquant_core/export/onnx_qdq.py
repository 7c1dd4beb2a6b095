"""One SegLinear → an ONNX QDQ subgraph (pure ``onnx``; no torch exporter involved).

The export (:mod:`.exporter`) leaves one placeholder node per SegLinear call in an otherwise float graph;
this module replaces each placeholder by the layer's arithmetic written with standard ONNX ops, so that
ONNX Runtime and TensorRT (explicit quantization) see exactly the scales we calibrated:

* smoothing: ``Div(x, s)`` — the stored weight already is ``W·s``;
* activations, static per tensor: ``QuantizeLinear → DequantizeLinear`` with a scalar scale, zero point 0;
* DualScale: two branches ``Relu(x)`` and ``Min(x, 0)``, each with its own Q/DQ pair (the codes of the
  positive branch can only be ≥ 0, those of the negative branch ≤ 0 — exactly the narrowed ranges of
  :func:`segquant_core.quantizers.encode_activation`) and its own MatMul; the two MatMuls are added. It is
  decided per in-segment (Flux's single-stream ``proj_out``: only the GELU-MLP part has two branches);
* weights: a ``DequantizeLinear`` of the integer (or fp8) codes stored transposed ``[K, N]`` with a
  per-output-channel scale (``axis=1``) — out-segments that share an input quantizer are merged into one
  MatMul whose per-channel scale holds each segment's scale, which is exact;
* in-segments: ``Split`` along K, one Q/DQ pair and MatMul per segment, partial products summed;
* out-segments with different input quantizers (own smoothing vector / activation scale): one branch each,
  outputs concatenated;
* low-rank pair: plain float ``MatMul(MatMul(x_s, down), up)`` on the unquantized smoothed input, added;
* bias: one ``Add`` at the end.

What cannot be expressed raises :class:`QDQExportError` naming the layer and why.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from onnx import NodeProto, TensorProto, helper, numpy_helper

from segquant_core.formats import TINY_AMAX, QuantFormat, pack_int4
from segquant_core.quantizers import Granularity
from segquant_core.seglinear import SegLinear

MARKER_DOMAIN = "segquant.export"
MARKER_OP = "SegLinear"
MIN_OPSET = 13  # per-axis QuantizeLinear/DequantizeLinear
FP8_OPSET = 19  # FLOAT8E4M3FN in Q/DQ
INT4_OPSET = 21  # INT4 in Q/DQ

_ELEM = {
    QuantFormat.INT8: TensorProto.INT8,
    QuantFormat.INT4: TensorProto.INT4,
    QuantFormat.FP8_E4M3: TensorProto.FLOAT8E4M3FN,
}


class QDQExportError(ValueError):
    """A layer whose quantization cannot be written as an ONNX QDQ graph (the message names it)."""

    def __init__(self, layer: str, reason: str) -> None:
        super().__init__(f"cannot export layer {layer!r} as ONNX QDQ: {reason}")
        self.layer = layer
        self.reason = reason


@dataclass
class LayerQDQ:
    """What was emitted for one SegLinear: node counts by role (the tests hold these to the plan)."""

    name: str
    description: str
    groups: int  # input groups: one Q/DQ set + one weight DQ each
    parts: int  # 1, or 2 for DualScale (on at least one group)
    quantize_linear: int = 0
    act_dequantize: int = 0
    weight_dequantize: int = 0
    matmuls: int = 0
    calls: int = 0
    notes: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------ planning
def input_groups(layer: SegLinear) -> list[list[int]]:
    """Segments that can share one input quantizer and one MatMul.

    In-segments each see their own input columns: one group each. Consecutive out-segments whose
    smoothing vector and activation scale are identical see the *same* quantized input, so they become
    one MatMul whose per-channel weight scale carries each segment's scale (exact); segments with their
    own smoothing/scale keep their own branch.
    """
    segs = list(layer.segs)
    if layer.cfg.segments.axis == "in":
        return [[k] for k in range(len(segs))]

    def same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
        if a is None or b is None:
            return a is None and b is None
        return a.shape == b.shape and bool(torch.equal(a, b))

    groups: list[list[int]] = [[0]]
    for k in range(1, len(segs)):
        prev = segs[groups[-1][0]]
        if same(prev.smooth, segs[k].smooth) and same(prev.act_scale, segs[k].act_scale):
            groups[-1].append(k)
        else:
            groups.append([k])
    return groups


def required_opset(layer: SegLinear) -> int:
    """Lowest opset that expresses ``layer`` natively (int4 weights fall back to int8 below 21)."""
    need = MIN_OPSET
    cfg = layer.cfg
    fmts = {cfg.weight.fmt if cfg.weight else None, cfg.activation.fmt if cfg.activation else None}
    if QuantFormat.FP8_E4M3 in fmts:
        need = max(need, FP8_OPSET)
    if QuantFormat.INT4 in fmts:
        need = max(need, INT4_OPSET)
    return need


def check_expressible(layer: SegLinear, name: str, opset: int, allow_dynamic: bool = False) -> list[str]:
    """Raise :class:`QDQExportError` if ``layer`` has no QDQ form at ``opset``; return notes otherwise."""
    cfg = layer.cfg
    act = cfg.activation
    notes: list[str] = []
    if opset < MIN_OPSET:
        raise QDQExportError(name, f"opset {opset} has no per-channel DequantizeLinear (need ≥ {MIN_OPSET})")
    if act is not None and act.dynamic and not allow_dynamic:
        per = "per token" if act.granularity is Granularity.TOKEN else "per tensor"
        raise QDQExportError(
            name,
            f"its activations are quantized dynamically ({per}, recomputed at every call). ONNX "
            "QuantizeLinear has no such quantizer (DynamicQuantizeLinear is per-tensor asymmetric uint8, "
            "not this symmetric int8 scheme), and TensorRT needs Q/DQ scales that are build-time constants. "
            "Export a recipe with static activation scales (w8a8-segquant, w8a8-smooth, fp8-segquant), or pass "
            "allow_dynamic=True / --dynamic-activations for an ONNX-Runtime-only graph that computes the "
            "scales in-graph (ReduceMax → runtime-scale QuantizeLinear)",
        )
    if act is not None and act.dynamic:
        notes.append("dynamic activation scales computed in-graph (ONNX Runtime only; TensorRT needs constant scales)")
    for what, fmt in (("weights", cfg.weight.fmt if cfg.weight else None), ("activations", act.fmt if act else None)):
        if fmt is QuantFormat.FP8_E4M3 and opset < FP8_OPSET:
            raise QDQExportError(name, f"fp8 {what} need opset ≥ {FP8_OPSET} (FLOAT8E4M3FN Q/DQ), got {opset}")
        if fmt is QuantFormat.INT4 and opset < INT4_OPSET:
            if what == "activations":
                raise QDQExportError(name, f"int4 activations need opset ≥ {INT4_OPSET} (INT4 QuantizeLinear)")
            notes.append(f"int4 weights stored as int8 codes (opset {opset} < {INT4_OPSET} has no INT4)")
    return notes


def describe(layer: SegLinear) -> str:
    """Short kind string: ``w=int8/tensor a=int8-dual in[16,16] smooth``."""
    cfg = layer.cfg
    w = f"{cfg.weight.fmt.value}/{cfg.weight.granularity.value}" if cfg.weight else "float"
    a = "float"
    if cfg.activation:
        a = cfg.activation.fmt.value + ("-dual" if cfg.activation.dual else "")
        if cfg.dual_segments is not None:
            a += str([i for i, d in enumerate(cfg.dual_segments) if d])
        a += f"-dyn/{cfg.activation.granularity.value}" if cfg.activation.dynamic else ""
    seg = f" {cfg.segments.axis}{list(cfg.segments.sizes)}" if cfg.segments.count > 1 else ""
    extra = (" smooth" if cfg.smooth else "") + (f" lowrank{cfg.lowrank_rank}" if cfg.lowrank_rank else "")
    return f"w={w} a={a}{seg}{extra}"


# ------------------------------------------------------------------------------------------ emission
class GraphParts:
    """Nodes and initializers being added to one graph, with graph-wide unique names."""

    def __init__(self, taken: Iterable[str]) -> None:
        self.taken: set[str] = set(taken)
        self.nodes: list[NodeProto] = []
        self.initializers: dict[str, TensorProto] = {}

    def fresh(self, base: str) -> str:
        name, i = base, 1
        while name in self.taken:
            i += 1
            name = f"{base}_{i}"
        self.taken.add(name)
        return name

    def init(self, name: str, value: np.ndarray | TensorProto) -> str:
        """Add an initializer once (a layer called twice reuses its weights)."""
        if name not in self.initializers:
            t = value if isinstance(value, TensorProto) else numpy_helper.from_array(np.asarray(value), name)
            t.name = name
            self.initializers[name] = t
            self.taken.add(name)
        return name

    def node(self, op: str, inputs: list[str], name: str, outputs: int = 1, **attrs: Any) -> list[str]:
        node_name = self.fresh(name)
        outs = [node_name if outputs == 1 else self.fresh(f"{node_name}:{i}") for i in range(outputs)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=node_name, **attrs))
        return outs

    def one(self, op: str, inputs: list[str], name: str, **attrs: Any) -> str:
        return self.node(op, inputs, name, 1, **attrs)[0]


def _f32(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy()


def _zero_point(parts: GraphParts, fmt: QuantFormat) -> str:
    name = f"segquant.zero_point.{fmt.value}"
    return parts.init(name, helper.make_tensor(name, _ELEM[fmt], [], [0.0 if fmt is QuantFormat.FP8_E4M3 else 0]))


def _weight_tensor(name: str, codes_t: torch.Tensor, fmt: QuantFormat, opset: int) -> TensorProto:
    """Codes ``[K, N]`` as an initializer: int8, packed INT4 (opset ≥ 21; else int8) or FLOAT8E4M3FN."""
    dims = list(codes_t.shape)
    if fmt is QuantFormat.FP8_E4M3:
        raw = codes_t.contiguous().view(torch.uint8).numpy().tobytes()
        return helper.make_tensor(name, TensorProto.FLOAT8E4M3FN, dims, raw, raw=True)
    if fmt is QuantFormat.INT4 and opset >= INT4_OPSET:
        flat = codes_t.contiguous().reshape(-1)
        if flat.numel() % 2:
            flat = torch.cat([flat, flat.new_zeros(1)])
        raw = pack_int4(flat).numpy().tobytes()  # ONNX packs in flat order, element 0 in the low nibble
        return helper.make_tensor(name, TensorProto.INT4, dims, raw, raw=True)
    return numpy_helper.from_array(codes_t.contiguous().numpy().astype(np.int8), name)


def _weight_dq(
    parts: GraphParts, layer: SegLinear, group: list[int], base: str, tag: str, node: str, opset: int
) -> str:
    """``DequantizeLinear`` of the group's weight ``[K, N_g]`` (per-channel scale along axis 1)."""
    segs = [layer.segs[k] for k in group]
    if segs[0].fmt is None:  # a float SegLinear (no weight quantizer): plain initializer
        w = torch.cat([s.weight.float().t() for s in segs], dim=1)
        return parts.init(f"{base}.{tag}.weight", _f32(w))
    fmt = segs[0].fmt
    codes = torch.cat([s.quantized_weight().codes().cpu().t() for s in segs], dim=1)
    q = parts.init(f"{base}.{tag}.weight_q", _weight_tensor(f"{base}.{tag}.weight_q", codes, fmt, opset))
    scales = [s.weight_scale.detach().float().cpu().reshape(-1) for s in segs]
    if len(segs) == 1 and scales[0].numel() == 1:
        scale = parts.init(f"{base}.{tag}.weight_scale", _f32(scales[0].reshape(())))
        return parts.one("DequantizeLinear", [q, scale], f"{node}/weight_dq")
    per_channel = torch.cat([sc.expand(s.weight.shape[0]) for sc, s in zip(scales, segs)])
    scale = parts.init(f"{base}.{tag}.weight_scale", _f32(per_channel))
    return parts.one("DequantizeLinear", [q, scale], f"{node}/weight_dq", axis=1)


def _static_qdq(parts: GraphParts, x: str, scale: float, fmt: QuantFormat, name: str, node: str) -> str:
    s = parts.init(name, np.array(scale, dtype=np.float32))
    zp = _zero_point(parts, fmt)
    q = parts.one("QuantizeLinear", [x, s, zp], f"{node}/q")
    return parts.one("DequantizeLinear", [q, s, zp], f"{node}/dq")


def _dynamic_qdq(
    parts: GraphParts, x: str, k: int, fmt: QuantFormat, per_token: bool, side: str, node: str, opset: int
) -> str:
    """Scale computed in-graph like :func:`segquant_core.formats.scale_from_amax`, then runtime-scale Q/DQ."""
    denom = -fmt.qmin if side == "neg" else fmt.qmax
    src = x
    if side == "neg":
        src = parts.one("Neg", [x], f"{node}/neg")
    elif side == "both":
        src = parts.one("Abs", [x], f"{node}/abs")
    c = {
        n: parts.init(f"segquant.const.{n}", np.array(v, dtype=np.float32))
        for n, v in (("denom_" + str(int(denom)), denom), ("tiny", TINY_AMAX), ("one", 1.0))
    }
    if per_token:
        shape = parts.init(f"segquant.const.rows_{k}", np.array([-1, k], dtype=np.int64))
        x2 = parts.one("Reshape", [x, shape], f"{node}/rows")
        src2 = parts.one("Reshape", [src, shape], f"{node}/rows_src")
        if opset >= 18:  # ReduceMax takes its axes as an input from opset 18 on
            axes = parts.init("segquant.const.axes_1", np.array([1], dtype=np.int64))
            amax = parts.one("ReduceMax", [src2, axes], f"{node}/amax", keepdims=0)
        else:
            amax = parts.one("ReduceMax", [src2], f"{node}/amax", keepdims=0, axes=[1])
    else:
        x2 = x
        amax = parts.one("ReduceMax", [src], f"{node}/amax", keepdims=0)
    raw = parts.one("Div", [amax, c["denom_" + str(int(denom))]], f"{node}/raw_scale")
    big = parts.one("Greater", [amax, c["tiny"]], f"{node}/nonzero")
    scale = parts.one("Where", [big, raw, c["one"]], f"{node}/scale")
    if per_token:
        zero_value = helper.make_tensor("value", _ELEM[fmt], [1], [0.0 if fmt is QuantFormat.FP8_E4M3 else 0])
        zp = parts.one(
            "ConstantOfShape", [parts.one("Shape", [scale], f"{node}/rows_shape")], f"{node}/zp", value=zero_value
        )
        q = parts.one("QuantizeLinear", [x2, scale, zp], f"{node}/q", axis=0)
        dq = parts.one("DequantizeLinear", [q, scale, zp], f"{node}/dq", axis=0)
        return parts.one("Reshape", [dq, parts.one("Shape", [x], f"{node}/shape")], f"{node}/unrows")
    zp = _zero_point(parts, fmt)
    q = parts.one("QuantizeLinear", [x2, scale, zp], f"{node}/q")
    return parts.one("DequantizeLinear", [q, scale, zp], f"{node}/dq")


def _dual_split(parts: GraphParts, x: str, fmt: QuantFormat, node: str) -> tuple[str, str]:
    """DualScale's two branches: ``max(x, 0)`` and ``min(x, 0)``.

    The positive part is ``Relu`` for integer codes (the pattern TensorRT and ONNX Runtime expect) but
    ``Max(x, 0)`` for fp8: ONNX Runtime 1.32's CPU ``Relu → QuantizeLinear`` fusion (optimization level ≥ 2)
    drops a Relu in front of a FLOAT8E4M3FN QuantizeLinear with zero point 0 although fp8 codes are signed,
    which lets negative values into the positive branch (observed: 6 % output error on a two-layer model).
    """
    zero = parts.init("segquant.const.zero", np.array(0.0, dtype=np.float32))
    if fmt is QuantFormat.FP8_E4M3:
        pos = parts.one("Max", [x, zero], f"{node}/pos")
    else:
        pos = parts.one("Relu", [x], f"{node}/pos")
    return pos, parts.one("Min", [x, zero], f"{node}/neg")


def emit_seglinear(
    parts: GraphParts, layer: SegLinear, name: str, x: str, y: str, opset: int, call: int = 0
) -> LayerQDQ:
    """Append the QDQ subgraph computing ``y = layer(x)`` to ``parts``; returns the emitted counts.

    ``call`` numbers repeated calls of one layer (nodes get fresh names, weights are shared).
    """
    cfg = layer.cfg
    groups = input_groups(layer)
    parts_per = cfg.activation.parts if cfg.activation is not None else 1
    rep = LayerQDQ(name, describe(layer), len(groups), parts_per)
    base = name
    nbase = name if call == 0 else f"{name}#{call}"
    n_before = len(parts.nodes)
    bounds = cfg.segments.bounds()

    if cfg.segments.axis == "in" and len(groups) > 1:
        sizes = parts.init(f"{base}.split_sizes", np.array(cfg.segments.sizes, dtype=np.int64))
        inputs = parts.node("Split", [x, sizes], f"{nbase}/split", outputs=len(groups), axis=-1)
    else:
        inputs = [x] * len(groups)

    outs: list[str] = []
    for group, xin in zip(groups, inputs):
        first = layer.segs[group[0]]
        act = first.activation  # in-segments may differ in DualScale
        tag = f"seg{group[0]}" if len(group) == 1 else f"seg{group[0]}-{group[-1]}"
        node = f"{nbase}/{tag}"
        k_in = bounds[group[0]][1] - bounds[group[0]][0] if cfg.segments.axis == "in" else cfg.in_features
        xs = xin
        if first.smooth is not None:
            xs = parts.one("Div", [xin, parts.init(f"{base}.{tag}.smooth", _f32(first.smooth))], f"{node}/smooth")
        branches: list[str]
        if act is None:
            branches = [xs]
        elif act.dynamic:
            per_token = act.granularity is Granularity.TOKEN
            if act.dual:
                pos, neg = _dual_split(parts, xs, act.fmt, node)
                branches = [
                    _dynamic_qdq(parts, pos, k_in, act.fmt, per_token, "pos", f"{node}/pos", opset),
                    _dynamic_qdq(parts, neg, k_in, act.fmt, per_token, "neg", f"{node}/neg", opset),
                ]
            else:
                branches = [_dynamic_qdq(parts, xs, k_in, act.fmt, per_token, "both", f"{node}/act", opset)]
        else:
            scales = first.act_scale.float().reshape(-1).tolist()
            if act.dual:
                pos, neg = _dual_split(parts, xs, act.fmt, node)
                branches = [
                    _static_qdq(parts, pos, scales[0], act.fmt, f"{base}.{tag}.act_scale_pos", f"{node}/pos"),
                    _static_qdq(parts, neg, scales[1], act.fmt, f"{base}.{tag}.act_scale_neg", f"{node}/neg"),
                ]
            else:
                branches = [_static_qdq(parts, xs, scales[0], act.fmt, f"{base}.{tag}.act_scale", f"{node}/act")]
        w = _weight_dq(parts, layer, group, base, tag, node, opset)
        prods = [
            parts.one("MatMul", [b, w], f"{node}/matmul" + ("" if len(branches) == 1 else f"_{p}"))
            for p, b in zip(("pos", "neg"), branches)
        ]
        out = prods[0] if len(prods) == 1 else parts.one("Add", prods, f"{node}/dual_add")
        lowranks = []
        for k in group:
            seg = layer.segs[k]
            if seg.lowrank_down is None or seg.lowrank_up is None:
                continue
            down = parts.init(f"{base}.seg{k}.lowrank_down", _f32(seg.lowrank_down))
            up = parts.init(f"{base}.seg{k}.lowrank_up", _f32(seg.lowrank_up))
            h = parts.one("MatMul", [xs, down], f"{nbase}/seg{k}/lowrank_down")
            lowranks.append(parts.one("MatMul", [h, up], f"{nbase}/seg{k}/lowrank_up"))
        if lowranks:
            lr = lowranks[0] if len(lowranks) == 1 else parts.one("Concat", lowranks, f"{node}/lowrank_cat", axis=-1)
            out = parts.one("Add", [out, lr], f"{node}/lowrank_add")
        outs.append(out)

    if len(outs) == 1:
        result = outs[0]
    elif cfg.segments.axis == "out":
        result = parts.one("Concat", outs, f"{nbase}/concat", axis=-1)
    else:
        result = parts.one("Sum", outs, f"{nbase}/sum")
    if layer.bias is not None:
        result = parts.one("Add", [result, parts.init(f"{base}.bias", _f32(layer.bias))], f"{nbase}/bias")
    # the last node writes straight into the placeholder's output name, so consumers are untouched
    last = parts.nodes[-1]
    assert last.output[0] == result
    last.output[0] = y

    for n in parts.nodes[n_before:]:
        if n.op_type == "QuantizeLinear":
            rep.quantize_linear += 1
        elif n.op_type == "DequantizeLinear":
            if n.name.endswith("/weight_dq"):
                rep.weight_dequantize += 1
            else:
                rep.act_dequantize += 1
        elif n.op_type == "MatMul":
            rep.matmuls += 1
    rep.calls = call + 1
    return rep
