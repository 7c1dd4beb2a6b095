"""Tiny denoisers, a cache of quantized copies, and independent QDQ bookkeeping for the ONNX export tests.

Counting is done here from first principles (layer configs and the graph), not with the exporter's own
report, so the tests hold the exporter to the plan: per SegLinear, one Q/DQ pair per quantized input
segment and DualScale branch, one weight DequantizeLinear per segment (out-segments that share one input
quantizer share one MatMul and one per-channel weight DQ), two float MatMuls per low-rank pair.
"""

from __future__ import annotations

import functools
import itertools
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from diffusers import PixArtTransformer2DModel
from torch import nn

import segquant_core as sq
from segquant_core.backends.reference import ReferenceBackend
from segquant_core.detect import example_inputs_for
from segquant_core.export.exporter import flatten_inputs
from tests.detect.detect_tiny_models import tiny_flux

KINDS = ("mmdit", "unet", "flux", "pixart")
ROWS = 128  # calibration rows per layer: plenty for tiny layers, keeps the α search quick


def tiny_model(kind: str) -> nn.Module:
    """Random-weight denoisers: the two tiny shapes pipelines' and small Flux / PixArt configs."""
    torch.manual_seed(0)
    if kind in ("mmdit", "unet"):
        import segquant_shapes

        pipe = segquant_shapes.tiny_random_pipeline(kind, seed=0)
        return sq.denoiser_of(pipe).eval()
    if kind == "flux":
        return tiny_flux()
    if kind == "pixart":
        return PixArtTransformer2DModel(
            num_attention_heads=2,
            attention_head_dim=8,
            in_channels=4,
            out_channels=8,
            num_layers=1,
            cross_attention_dim=16,
            caption_channels=32,
            sample_size=8,
            patch_size=2,
        ).eval()
    raise ValueError(kind)


@functools.cache
def quantized(kind: str, recipe: str) -> tuple[nn.Module, dict[str, Any]]:
    """``(model, example kwargs)`` quantized directly on two copies of its example inputs (cached)."""
    model = tiny_model(kind)
    kwargs = example_inputs_for(model)
    sq.quantize(model, recipe, [kwargs] * 2, rows_per_layer=ROWS, progress=False)
    return model, kwargs


def reference_output(model: nn.Module, kwargs: dict[str, Any]) -> np.ndarray:
    """The model's output with every SegLinear on the reference backend (backends restored after)."""
    layers = [m for m in model.modules() if isinstance(m, sq.SegLinear)]
    saved = [m._backend for m in layers]
    try:
        for m in layers:
            m.set_backend(ReferenceBackend())
        with torch.no_grad():
            out = model(**kwargs)
        return (out[0] if isinstance(out, (tuple, list)) else out).float().numpy()
    finally:
        for m, b in zip(layers, saved):
            if b is not None:
                m.set_backend(b)


def ort_output(path: str | Path, kwargs: dict[str, Any]) -> np.ndarray:
    from segquant_core.export.check import ort_session

    session = ort_session(path, threads=1)
    names, tensors = flatten_inputs(kwargs)
    feeds = {n: t.numpy() for n, t in zip(names, tensors)}
    return session.run(None, {i.name: feeds[i.name] for i in session.get_inputs()})[0]


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - b) / np.linalg.norm(b.astype(np.float64)))


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and bool(torch.equal(a, b))


def expected_counts(layer: sq.SegLinear) -> Counter[str]:
    """What the plan asks of one SegLinear call, from its config and buffers alone."""
    cfg = layer.cfg
    segs = list(layer.segs)
    if cfg.segments.axis == "in":  # one group per segment, each with its own DualScale flag
        parts = [0 if s.activation is None else s.activation.parts for s in segs]
    else:  # out-segments with the same input quantizer (smoothing vector + activation scale) share one
        groups = 1 + sum(
            not (_same(a.smooth, b.smooth) and _same(a.act_scale, b.act_scale)) for a, b in itertools.pairwise(segs)
        )
        parts = [0 if cfg.activation is None else cfg.activation.parts] * groups
    lowrank = sum(s.lowrank_down is not None for s in segs)
    return Counter(
        {
            "QuantizeLinear": sum(parts),
            "act_DequantizeLinear": sum(parts),
            "weight_DequantizeLinear": len(parts) if cfg.weight else 0,
            "MatMul": sum(max(p, 1) for p in parts) + 2 * lowrank,
        }
    )


def graph_counts(model_proto: onnx.ModelProto, layer: str) -> Counter[str]:
    """Q/DQ/MatMul nodes of one layer's subgraph (nodes are named ``<layer>/…``).

    A DequantizeLinear whose input is an initializer is a weight DQ; any other is an activation DQ.
    """
    inits = {t.name for t in model_proto.graph.initializer}
    c: Counter[str] = Counter()
    for n in model_proto.graph.node:
        if not n.name.startswith(layer + "/"):
            continue
        if n.op_type == "DequantizeLinear":
            c["weight_DequantizeLinear" if n.input[0] in inits else "act_DequantizeLinear"] += 1
        elif n.op_type in ("QuantizeLinear", "MatMul"):
            c[n.op_type] += 1
    return c


def assert_plan_counts(model: nn.Module, path: str | Path) -> onnx.ModelProto:
    """Check the graph (onnx.checker with shape inference) and every layer's QDQ node counts."""
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, sq.SegLinear)}
    assert layers
    total: Counter[str] = Counter()
    for name, layer in layers.items():
        want = expected_counts(layer)
        got = graph_counts(proto, name)
        assert +got == +want, f"{name}: {dict(got)} != plan {dict(want)}"
        total += want
    ops = Counter(n.op_type for n in proto.graph.node)
    # no stray Q/DQ anywhere else in the graph
    assert ops["QuantizeLinear"] == total["QuantizeLinear"]
    assert ops["DequantizeLinear"] == total["act_DequantizeLinear"] + total["weight_DequantizeLinear"]
    assert not [n for n in proto.graph.node if n.domain == "segquant.export"]
    return proto
