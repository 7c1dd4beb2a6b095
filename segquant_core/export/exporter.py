"""Export a SegQuant-quantized denoiser as an ONNX QDQ graph.

How: every :class:`SegLinear` is swapped, for the duration of the export only, for a stub that calls one
opaque custom op, ``segquant_export::seglinear(x, layer, out_features)``. The torch exporter writes the float
model around it and leaves one placeholder node ``segquant.export::SegLinear`` per call; we then replace each
placeholder by the layer's QDQ subgraph (:mod:`.onnx_qdq`), written with ``onnx.helper`` from the layer's
own codes and scales. Why this way and not fake-quant ops inside the torch graph: the exporters map
``fake_quantize_*`` to Q/DQ pairs only for 8-bit uint/int ranges and cannot produce a DequantizeLinear of an
int8/int4/fp8 *initializer* at all, so weights would be stored as floats; the placeholder keeps the torch
exporter's job to the float model (which it does well) and puts every quantization detail in code we own.

Exporters (``exporter=``):

* ``"dynamo"`` (default): ``torch.onnx.export(..., dynamo=True)`` — torch.export + onnxscript, the
  maintained path. It exports SD3, Flux, PixArt and the UNet; we override its translation of
  ``aten.squeeze.dim`` because onnxscript emits an ONNX ``Squeeze`` even when the dim is not 1 (a no-op in
  torch, an error in ONNX — PixArt's ``proj_out(...).squeeze(1)`` hits it).
* ``"torchscript"``: the legacy tracer (``dynamo=False``, deprecated since torch 2.9) — 5-10× faster to export,
  stops at opset 20, and has no symbolic for ``aten::rms_norm`` (Flux's RMSNorm): we register one.

The graph has static shapes (those of the example inputs). The file is written to a temporary name next to
``path`` and renamed at the end, so a failure never leaves a half-written model.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

from segquant_core.export.onnx_qdq import (
    MARKER_DOMAIN,
    MARKER_OP,
    GraphParts,
    LayerQDQ,
    QDQExportError,
    check_expressible,
    emit_seglinear,
    required_opset,
)
from segquant_core.seglinear import SegLinear

logger = logging.getLogger(__name__)

DEFAULT_OPSET = 18
OUTPUT_NAME = "output"  # not "sample": that is the UNet's input name
TORCHSCRIPT_MAX_OPSET = 20
EXPORTERS = ("dynamo", "torchscript")
_PROTO_LIMIT = 2**31 - 2**26  # stay clear of protobuf's 2 GiB cap: larger graphs use external data

# Layers reachable from the custom op's eager implementation (used by the TorchScript tracer, which runs the
# real computation); filled only inside _stubbed().
_LIVE: dict[int, SegLinear] = {}


@torch.library.custom_op("segquant_export::seglinear", mutates_args=())
def _seglinear_op(x: torch.Tensor, layer: int, out_features: int) -> torch.Tensor:
    """Placeholder for one SegLinear call; eagerly it computes the layer itself (reference arithmetic)."""
    mod = _LIVE.get(layer)
    if mod is None:
        return x.new_zeros((*x.shape[:-1], out_features))
    with torch.no_grad():
        return mod(x).clone()


@_seglinear_op.register_fake
def _(x: torch.Tensor, layer: int, out_features: int) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], out_features))


class _SegLinearStub(nn.Module):
    """Stands in for a SegLinear during export; holds only its index (no buffers, so none are exported)."""

    def __init__(self, index: int, in_features: int, out_features: int) -> None:
        super().__init__()
        self.index = index
        self.in_features = in_features
        self.out_features = out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.segquant_export.seglinear(x, self.index, self.out_features)


@dataclass
class ExportResult:
    """What :func:`export_onnx` wrote."""

    path: Path
    opset: int
    exporter: str
    input_names: list[str]
    output_names: list[str]
    layers: dict[str, LayerQDQ] = field(default_factory=dict)
    node_counts: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    bytes: int = 0
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "opset": self.opset,
            "exporter": self.exporter,
            "quantized_layers": len(self.layers),
            "inputs": self.input_names,
            "QuantizeLinear": self.node_counts.get("QuantizeLinear", 0),
            "DequantizeLinear": self.node_counts.get("DequantizeLinear", 0),
            "MatMul": self.node_counts.get("MatMul", 0),
            "bytes": self.bytes,
            "seconds": round(self.seconds, 2),
            "notes": self.notes,
        }


# ------------------------------------------------------------------------------------------ inputs
def flatten_inputs(kwargs: dict[str, Any]) -> tuple[list[str], list[torch.Tensor]]:
    """Tensor leaves of ``kwargs`` (one level of nested dicts, e.g. SDXL's ``added_cond_kwargs``) in order.

    Names are the leaf keys (``text_embeds``), or ``parent.leaf`` where a leaf key repeats.
    """
    leaves: list[tuple[tuple[str, ...], torch.Tensor]] = []

    def walk(prefix: tuple[str, ...], d: dict[str, Any]) -> None:
        for k, v in d.items():
            if isinstance(v, torch.Tensor):
                leaves.append(((*prefix, k), v))
            elif isinstance(v, dict):
                walk((*prefix, k), v)

    walk((), kwargs)
    short = [p[-1] for p, _ in leaves]
    names = [p[-1] if short.count(p[-1]) == 1 else ".".join(p) for p, _ in leaves]
    return names, [t for _, t in leaves]


class FlatInputs(nn.Module):
    """Calls ``model(**kwargs)`` with the tensor leaves given positionally; returns the first output.

    Gives the ONNX graph flat, named inputs and one output; non-tensor kwargs (``return_dict=False``,
    ``None`` conditions) are baked in.
    """

    def __init__(self, model: nn.Module, kwargs: dict[str, Any]) -> None:
        super().__init__()
        self.model = model
        self.template = kwargs
        self.names, _ = flatten_inputs(kwargs)

    def rebuild(self, tensors: tuple[torch.Tensor, ...]) -> dict[str, Any]:
        it = iter(tensors)

        def fill(d: dict[str, Any]) -> dict[str, Any]:
            out: dict[str, Any] = {}
            for k, v in d.items():
                if isinstance(v, torch.Tensor):
                    out[k] = next(it)
                elif isinstance(v, dict):
                    out[k] = fill(v)
                else:
                    out[k] = v
            return out

        return fill(self.template)

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        out = self.model(**self.rebuild(tensors))
        if isinstance(out, (tuple, list)):
            return out[0]
        return out.sample if hasattr(out, "sample") else out


# ------------------------------------------------------------------------------------------ helpers
def seglinears(model: nn.Module) -> dict[str, SegLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, SegLinear)}


def choose_opset(layers: dict[str, SegLinear], requested: int | None, exporter: str) -> int:
    """The requested opset, or the lowest that expresses every layer natively (≥ 18)."""
    if requested is not None:
        return int(requested)
    need = max([DEFAULT_OPSET, *(required_opset(m) for m in layers.values())])
    if exporter == "torchscript":
        need = min(need, TORCHSCRIPT_MAX_OPSET)
    return need


def preflight(layers: dict[str, SegLinear], opset: int, allow_dynamic: bool) -> list[str]:
    """Check every layer before the (slow) export: the first inexpressible one raises, naming it."""
    notes: set[str] = set()
    for name, layer in layers.items():
        notes.update(check_expressible(layer, name, opset, allow_dynamic))
    return sorted(notes)


@contextlib.contextmanager
def _stubbed(model: nn.Module, layers: dict[str, SegLinear]) -> Iterator[dict[int, str]]:
    """Swap each SegLinear for a stub; restore the originals whatever happens."""
    index: dict[int, str] = {}
    try:
        for i, (name, layer) in enumerate(layers.items()):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, _SegLinearStub(i, layer.in_features, layer.out_features))
            index[i] = name
            _LIVE[i] = layer
        yield index
    finally:
        for i, name in index.items():
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, layers[name])
            _LIVE.pop(i, None)


def _register_marker_schema() -> None:
    """The dynamo exporter only emits ops that have an ONNX schema: declare our placeholder's, once."""
    if onnx.defs.has(MARKER_OP, MARKER_DOMAIN):
        return
    s = onnx.defs.OpSchema
    onnx.defs.register_schema(
        s(
            MARKER_OP,
            MARKER_DOMAIN,
            1,
            inputs=[s.FormalParameter("X", "T")],
            outputs=[s.FormalParameter("Y", "T")],
            type_constraints=[
                ("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)", "tensor(double)"], "float types")
            ],
            attributes=[
                s.Attribute("layer", s.AttrType.INT, "stub index"),
                s.Attribute("out_features", s.AttrType.INT, "N"),
            ],
        )
    )


def _dynamo_translations() -> dict[Any, Any]:
    import onnxscript
    from onnxscript import opset18 as op

    _register_marker_schema()
    marker = onnxscript.values.Opset(MARKER_DOMAIN, 1)

    def seglinear(x: Any, layer: int, out_features: int) -> Any:
        return getattr(marker, MARKER_OP)(x, layer=layer, out_features=out_features)

    def squeeze_dim(self: Any, dim: int) -> Any:
        """torch's squeeze(dim) is a no-op when that dim is not 1; ONNX Squeeze would fail there."""
        shape = self.shape
        if shape is None or len(shape) == 0:
            return op.Identity(self)
        size = shape[dim]
        if isinstance(size, int) and size != 1:
            return op.Identity(self)
        return op.Squeeze(self, op.Constant(value_ints=[dim]))

    return {torch.ops.segquant_export.seglinear.default: seglinear, torch.ops.aten.squeeze.dim: squeeze_dim}


def _torchscript_symbolic(g: Any, x: Any, layer: Any, out_features: Any) -> Any:
    from torch.onnx import symbolic_helper

    idx = symbolic_helper._get_const(layer, "i", "layer")
    n = symbolic_helper._get_const(out_features, "i", "out_features")
    out = g.op(f"{MARKER_DOMAIN}::{MARKER_OP}", x, layer_i=idx, out_features_i=n)
    sizes = symbolic_helper._get_tensor_sizes(x)
    if sizes:
        out.setType(x.type().with_sizes([*sizes[:-1], n]))
    return out


def _rms_norm_symbolic(g: Any, x: Any, normalized_shape: Any, weight: Any, eps: Any) -> Any:
    """``aten::rms_norm`` for the TorchScript exporter (which has none; Flux's RMSNorm uses it).

    ``x / sqrt(mean(x², last dims) + eps) · weight``, eps defaulting to the dtype's epsilon like torch.
    """
    from torch.onnx import symbolic_helper

    dims = symbolic_helper._get_const(normalized_shape, "is", "normalized_shape")
    axes = list(range(-len(dims), 0))
    eps_value = None if symbolic_helper._is_none(eps) else symbolic_helper._get_const(eps, "f", "eps")
    if eps_value is None:
        eps_value = float(torch.finfo(torch.float32).eps)
    square = g.op("Mul", x, x)
    if g.opset >= 18:
        mean = g.op("ReduceMean", square, g.op("Constant", value_t=torch.tensor(axes, dtype=torch.long)), keepdims_i=1)
    else:
        mean = g.op("ReduceMean", square, axes_i=axes, keepdims_i=1)
    denom = g.op("Sqrt", g.op("Add", mean, g.op("Constant", value_t=torch.tensor(eps_value, dtype=torch.float32))))
    out = g.op("Div", x, denom)
    if not symbolic_helper._is_none(weight):
        out = g.op("Mul", out, weight)
    return out


def _export_float(
    wrapper: FlatInputs, args: tuple[torch.Tensor, ...], names: list[str], opset: int, exporter: str
) -> onnx.ModelProto:
    """The float graph with one placeholder node per SegLinear call."""
    chatty = logging.getLogger("torch.onnx._internal.exporter._registration")  # "torchvision is not installed"
    level = chatty.level
    chatty.setLevel(logging.ERROR)
    try:
        return _export_float_quiet(wrapper, args, names, opset, exporter)
    finally:
        chatty.setLevel(level)


def _export_float_quiet(
    wrapper: FlatInputs, args: tuple[torch.Tensor, ...], names: list[str], opset: int, exporter: str
) -> onnx.ModelProto:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # exporter chatter (deprecations, tracer warnings)
        if exporter == "dynamo":
            prog = torch.onnx.export(
                wrapper,
                args,
                None,
                dynamo=True,
                opset_version=opset,
                input_names=names,
                output_names=[OUTPUT_NAME],
                custom_translation_table=_dynamo_translations(),
                verbose=False,
                optimize=True,
            )
            assert prog is not None
            return prog.model_proto
        from torch.onnx import register_custom_op_symbolic

        register_custom_op_symbolic("segquant_export::seglinear", _torchscript_symbolic, 9)
        register_custom_op_symbolic("aten::rms_norm", _rms_norm_symbolic, 9)
        buf = io.BytesIO()
        torch.onnx.export(
            wrapper,
            args,
            buf,
            dynamo=False,
            opset_version=opset,
            input_names=names,
            output_names=[OUTPUT_NAME],
            custom_opsets={MARKER_DOMAIN: 1},
            do_constant_folding=True,
        )
        return onnx.load_from_string(buf.getvalue())


def _all_names(graph: onnx.GraphProto) -> set[str]:
    names = {i.name for i in graph.input} | {o.name for o in graph.output} | {t.name for t in graph.initializer}
    for n in graph.node:
        names.update(n.output)
        names.add(n.name)
    return names


def replace_placeholders(
    model_proto: onnx.ModelProto, layers: dict[str, SegLinear], index: dict[int, str], opset: int
) -> dict[str, LayerQDQ]:
    """Swap every placeholder node for its layer's QDQ subgraph (in place, keeping topological order)."""
    graph = model_proto.graph
    parts = GraphParts(_all_names(graph))
    reports: dict[str, LayerQDQ] = {}
    new_nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        if node.domain != MARKER_DOMAIN:
            new_nodes.append(node)
            continue
        attrs = {a.name: a.i for a in node.attribute}
        name = index[int(attrs["layer"])]
        prev = reports.get(name)
        start = len(parts.nodes)
        rep = emit_seglinear(
            parts, layers[name], name, node.input[0], node.output[0], opset, call=prev.calls if prev else 0
        )
        if prev is not None:  # a layer called more than once: accumulate its counts
            for k in ("quantize_linear", "act_dequantize", "weight_dequantize", "matmuls"):
                setattr(prev, k, getattr(prev, k) + getattr(rep, k))
            prev.calls = rep.calls
        else:
            reports[name] = rep
        new_nodes.extend(parts.nodes[start:])
    del graph.node[:]
    graph.node.extend(new_nodes)
    graph.initializer.extend(parts.initializers.values())
    kept = [o for o in model_proto.opset_import if o.domain != MARKER_DOMAIN]
    del model_proto.opset_import[:]
    model_proto.opset_import.extend(kept)
    for i in range(len(model_proto.functions) - 1, -1, -1):
        if model_proto.functions[i].domain == MARKER_DOMAIN:
            del model_proto.functions[i]
    leftover = [n.name for n in graph.node if n.domain == MARKER_DOMAIN]
    if leftover:  # pragma: no cover - defensive
        raise RuntimeError(f"placeholders left in the graph: {leftover[:3]}")
    return reports


def save_atomic(model_proto: onnx.ModelProto, path: Path, check: bool = True) -> int:
    """Write ``path`` (plus ``path.data`` above ~2 GB) in a temporary folder, then rename into place.

    ``check`` runs ``onnx.checker.check_model`` with shape inference on the written file (by path, so that
    graphs with external data are checked too) before the rename. Returns the bytes written. A failure removes
    the temporary folder and leaves ``path`` untouched.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    large = model_proto.ByteSize() >= _PROTO_LIMIT
    data_name = path.name + ".data"
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        target = tmpdir / path.name
        if large:  # the model names its data file relatively: give it the final name up front
            onnx.save_model(
                model_proto,
                str(target),
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location=data_name,
                size_threshold=1024,
            )
        else:
            onnx.save_model(model_proto, str(target))
        if check:
            onnx.checker.check_model(str(target), full_check=True)
        total = target.stat().st_size
        if (tmpdir / data_name).exists():
            total += (tmpdir / data_name).stat().st_size
            os.replace(tmpdir / data_name, path.with_name(data_name))
        os.replace(target, path)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return total


# ------------------------------------------------------------------------------------------ entry point
def export_onnx(
    model: nn.Module,
    example_kwargs: dict[str, Any],
    path: str | Path,
    *,
    opset: int | None = None,
    exporter: str = "dynamo",
    allow_dynamic: bool = False,
    check: bool = True,
) -> ExportResult:
    """Export quantized ``model`` (called as ``model(**example_kwargs)``) as an ONNX QDQ graph at ``path``.

    ``opset`` defaults to the lowest that expresses every layer natively (18; 19 with fp8; 21 with int4).
    ``allow_dynamic`` lets dynamically-quantized activations through as in-graph scale computations (ONNX
    Runtime only). ``check`` runs ``onnx.checker.check_model`` (with shape inference) before the final rename.
    Raises :class:`QDQExportError` (a ``ValueError``) naming the first layer that cannot be expressed.
    The model is left as it was.
    """
    start = time.perf_counter()
    if exporter not in EXPORTERS:
        raise ValueError(f"unknown exporter {exporter!r}; expected one of: {', '.join(EXPORTERS)}")
    path = Path(path)
    layers = seglinears(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no SegLinear layers: load a segquant artifact into it first")
    opset = choose_opset(layers, opset, exporter)
    if exporter == "torchscript" and opset > TORCHSCRIPT_MAX_OPSET:
        raise ValueError(f"the TorchScript exporter stops at opset {TORCHSCRIPT_MAX_OPSET}; use exporter='dynamo'")
    notes = preflight(layers, opset, allow_dynamic)
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if dtypes - {torch.float32}:
        # our Q/DQ scales, smoothing vectors and low-rank pairs are fp32 initializers; ONNX does not mix types
        raise ValueError(
            f"export a float32 model (this one has {sorted(str(d) for d in dtypes)}); TensorRT and "
            "ONNX Runtime lower the float parts to fp16 themselves"
        )
    wrapper = FlatInputs(model, example_kwargs).eval()
    names, tensors = flatten_inputs(example_kwargs)
    was_training = model.training
    model.eval()
    try:
        with _stubbed(model, layers) as index:
            proto = _export_float(wrapper, tuple(tensors), names, opset, exporter)
    finally:
        model.train(was_training)
    reports = replace_placeholders(proto, layers, index, opset)
    missing = sorted(set(layers) - set(reports))
    if missing:
        notes.append(
            f"{len(missing)} SegLinear layer(s) not called by this forward, so not in the graph: "
            + ", ".join(missing[:5])
            + (" …" if len(missing) > 5 else "")
        )
    proto.producer_name = "segquant"
    counts: dict[str, int] = {}
    for n in proto.graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    size = save_atomic(proto, path, check=check)
    result = ExportResult(
        path=path,
        opset=opset,
        exporter=exporter,
        input_names=names,
        output_names=[o.name for o in proto.graph.output],
        layers=reports,
        node_counts=counts,
        notes=notes,
        bytes=size,
        seconds=time.perf_counter() - start,
    )
    logger.info("exported %s → %s: %s", type(model).__name__, path, result.summary())
    return result


__all__ = [
    "EXPORTERS",
    "ExportResult",
    "FlatInputs",
    "QDQExportError",
    "export_onnx",
    "flatten_inputs",
    "replace_placeholders",
    "seglinears",
]
