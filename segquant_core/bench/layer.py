"""``bench layer``: one linear layer at DiT shapes — float baselines vs SegQuant layers on real kernels.

Per shape the candidates are ``nn.Linear`` in fp32 and bf16 (and bf16 under ``torch.compile`` when it
works), ``torch.ao`` dynamic int8 (the CPU baseline a user would reach for), and SegLinear layers built by
the engine itself (calibrated on the benchmark's own random inputs) for plain / dual-scale / segmented
W8A8, W4A8 and, optionally, fp8 and the fake-quant reference. Each row also reports the output error
against fp32, so "faster" is always read next to "as accurate".
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from unittest import mock

import torch
import torch.nn.functional as F
from torch import nn

from segquant_core.bench.peers import Peer, mark_against_peers
from segquant_core.bench.timing import alternate
from segquant_core.detect.plan import LayerPlan, Plan, Segments
from segquant_core.quantize import quantize
from segquant_core.recipes import Recipe, recipe


@dataclass(frozen=True)
class LayerShape:
    """A benchmark case: ``M×K×N`` plus the SegQuant structure a layer of that role has."""

    name: str
    m: int
    k: int
    n: int
    segments: Segments | None = None  # the structure detection finds for this role
    gelu_input: bool = False  # input comes from GELU/SiLU (DualScale candidates)


def default_shapes(model: str = "sd35", tokens: tuple[int, ...] = (1024,), batch: int = 2) -> list[LayerShape]:
    """SD3.5-medium (dim 1536, 24×64 heads) or Flux (dim 3072, 24×128) linear shapes."""
    dim, heads = {"sd35": (1536, 24), "flux": (3072, 24)}[model]
    head_dim, ff = dim // heads, 4 * dim
    out: list[LayerShape] = []
    for m in tokens:
        out += [
            LayerShape(f"qkv/to_out {m}×{dim}×{dim}", m, dim, dim, Segments("in", (head_dim,) * heads)),
            LayerShape(f"ff up {m}×{dim}×{ff}", m, dim, ff),
            LayerShape(f"ff down {m}×{ff}×{dim}", m, ff, dim, gelu_input=True),
        ]
    out.append(LayerShape(f"adaln {batch}×{dim}×{6 * dim}", batch, dim, 6 * dim, Segments("out", (dim,) * 6), True))
    return out


def cpu_target_shapes() -> list[LayerShape]:
    """The shapes the CPU targets of the performance issue are stated at."""
    base = default_shapes("sd35", (1024,))
    dim = 1536
    return [*base[:3], LayerShape(f"qkv/to_out 4096×{dim}×{dim}", 4096, dim, dim, Segments("in", (64,) * 24)), base[3]]


class _One(nn.Module):
    def __init__(self, layer: nn.Linear) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def _inputs(shape: LayerShape, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape.m, shape.k, generator=g)
    if shape.gelu_input:
        x = F.gelu(x * 2.0, approximate="tanh")
    return x


def build_segquant(
    linear: nn.Linear,
    r: Recipe,
    segments: Segments | None,
    dual: bool,
    calib: list[torch.Tensor],
    backend: str = "auto",
) -> nn.Module:
    """A SegLinear for ``linear`` built by the engine's own flow (plan given explicitly)."""
    model = _One(copy.deepcopy(linear))
    plan = Plan([LayerPlan("layer", segments, dual)])
    quantize(model, r, [{"x": x} for x in calib], plan, backend=backend, progress=False)
    return model.layer


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref).norm() / ref.norm())


def segquant_variants(shape: LayerShape, include_fp8: bool = False) -> list[tuple[str, Recipe, Segments | None, bool]]:
    """``(row label, recipe, segments, dual)`` of the SegQuant layers benchmarked at ``shape``."""
    # The recipe's seg/dual switches must be on for the plan's segments / dual flag to take effect.
    variants: list[tuple[str, Recipe, Segments | None, bool]] = [
        ("segquant w8a8", recipe("w8a8"), None, False),
        ("segquant w8a8 dual", recipe("w8a8", dual=True), None, True),
    ]
    if shape.segments is not None:
        variants.append(
            (
                f"segquant w8a8 seg({shape.segments.axis}×{shape.segments.count})",
                recipe("w8a8", seg=True),
                shape.segments,
                False,
            )
        )
        if shape.gelu_input:
            variants.append(("segquant w8a8 seg+dual", recipe("w8a8", seg=True, dual=True), shape.segments, True))
    full = [f"seg({shape.segments.axis}×{shape.segments.count})"] if shape.segments is not None else []
    full += ["dual"] if shape.gelu_input else []
    variants.append(
        (
            f"segquant w8a8-segquant [smooth{''.join(', ' + f for f in full)}]",
            recipe("w8a8-segquant"),
            shape.segments,
            shape.gelu_input,
        )
    )
    variants.append(("segquant w4a8 (int4 w, dyn a)", recipe("w4a8-segquant", smooth=False, gptq=False), None, False))
    if include_fp8:
        variants.append(("segquant fp8", recipe("fp8-segquant"), None, False))
    return variants


def candidates_for(
    shape: LayerShape,
    *,
    include_compile: bool = True,
    include_fp8: bool = False,
    include_reference: bool = False,
    seed: int = 0,
    device: str = "cpu",
    peers: list[Peer] | None = None,
) -> tuple[dict[str, Callable[[], object]], dict[str, float], dict[str, int]]:
    """``(callables, rel. error vs fp32, weight bytes)`` for every candidate of ``shape`` on ``device``
    (on CUDA, bf16 is cuBLAS; torch.ao's dynamic int8 is CPU-only and left out there). Each of ``peers``
    builds the same float layer, calibrated on the same inputs, into its own int8 form."""
    torch.manual_seed(seed)
    lin = nn.Linear(shape.k, shape.n).eval().to(device)
    x32 = _inputs(shape, seed + 1).to(device)
    x16 = x32.to(torch.bfloat16)
    calib = [_inputs(shape, seed + 2 + i).to(device) for i in range(4)]
    with torch.no_grad():
        ref = lin(x32)
    lin16 = copy.deepcopy(lin).to(torch.bfloat16)
    fns: dict[str, Callable[[], object]] = {"fp32": lambda: lin(x32), "bf16": lambda: lin16(x16)}
    nbytes = {"fp32": shape.k * shape.n * 4, "bf16": shape.k * shape.n * 2}
    if include_compile:
        try:
            comp = torch.compile(lin16)
            with torch.no_grad():
                comp(x16)
            fns["bf16 compiled"] = lambda: comp(x16)
            nbytes["bf16 compiled"] = nbytes["bf16"]
        except Exception:  # a missing compiler just drops this baseline
            pass
    ao: nn.Module | None = None
    if device == "cpu":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ao = torch.ao.quantization.quantize_dynamic(nn.Sequential(copy.deepcopy(lin)), {nn.Linear}, torch.qint8)
        fns["torch.ao int8 dynamic"] = lambda: ao(x32)
        nbytes["torch.ao int8 dynamic"] = shape.k * shape.n + shape.n * 4
    variants = segquant_variants(shape, include_fp8)
    built: dict[str, nn.Module] = {}
    for name, r, seg, dual in variants:
        built[name] = build_segquant(lin, r, seg, dual, calib)
    if shape.segments is not None and shape.segments.axis == "in" and device == "cpu":
        # the opt-in one-GEMM form of the same per-head layer (backends/folding.py): its speed and its error
        with mock.patch.dict(os.environ, {"SEGQUANT_CPU_IN_SEGMENTS": "folded"}):
            built[f"segquant w8a8 seg(in×{shape.segments.count}) folded (opt-in)"] = build_segquant(
                lin, recipe("w8a8", seg=True), shape.segments, False, calib
            )
    if include_reference:
        built["segquant w8a8 (reference fake-quant)"] = build_segquant(
            lin, recipe("w8a8"), None, False, calib, backend="reference"
        )
    errors = {"fp32": 0.0}
    with torch.no_grad():
        errors["bf16"] = _rel_err(lin16(x16), ref)
        if ao is not None:
            errors["torch.ao int8 dynamic"] = _rel_err(ao(x32), ref)
        if "bf16 compiled" in fns:
            errors["bf16 compiled"] = errors["bf16"]
        for name, layer in built.items():
            errors[name] = _rel_err(layer(x16), ref)
            fns[name] = lambda layer=layer: layer(x16)
            nbytes[name] = layer.weight_nbytes()
    for peer in peers or []:
        built_peer = peer.build(_One(copy.deepcopy(lin)), {"x": x32}, [{"x": c} for c in calib])
        errors[peer.label] = _rel_err(built_peer.call()[0], ref)
        fns[peer.label] = built_peer.call
    return fns, errors, nbytes


def run_layer_bench(
    shapes: list[LayerShape],
    *,
    rounds: int = 10,
    include_compile: bool = True,
    include_fp8: bool = False,
    include_reference: bool = False,
    device: str = "cpu",
    progress: Callable[[str], None] | None = None,
    peers: list[Peer] | None = None,
) -> list[dict[str, object]]:
    """One table row per (shape, candidate): median ms, speed-up vs bf16 and fp32, error, weight bytes.

    On CUDA timing is synchronised around every call and each candidate's ``max_memory_allocated`` over
    one call is reported too. ``peers`` are timed in the same loop; every row then also says how it
    compares with each (:func:`~segquant_core.bench.peers.mark_against_peers`)."""
    rows: list[dict[str, object]] = []
    for shape in shapes:
        if progress:
            progress(shape.name)
        fns, errors, nbytes = candidates_for(
            shape,
            include_compile=include_compile,
            include_fp8=include_fp8,
            include_reference=include_reference,
            device=device,
            peers=peers,
        )
        with torch.no_grad():
            timings = alternate(fns, rounds=rounds, warmup=2, max_seconds=120, device=device)
            peaks = cuda_peaks(fns) if device.startswith("cuda") else {}
        bf16, fp32 = timings["bf16"].median_s, timings["fp32"].median_s
        ao = timings["torch.ao int8 dynamic"].median_s if "torch.ao int8 dynamic" in timings else None
        for name, t in timings.items():
            rows.append(
                {
                    "shape": shape.name,
                    "m": shape.m,
                    "k": shape.k,
                    "n": shape.n,
                    "candidate": name,
                    "median_ms": round(t.median_ms, 3),
                    "vs_bf16": round(bf16 / t.median_s, 3),
                    "vs_fp32": round(fp32 / t.median_s, 3),
                    "vs_torch_ao": round(ao / t.median_s, 3) if ao else None,
                    "rel_err": errors.get(name),
                    "weight_bytes": nbytes.get(name),
                    "rounds": len(t.samples),
                    **({"cuda_max_allocated_bytes": peaks[name]} if name in peaks else {}),
                }
            )
    if peers:
        mark_against_peers(rows, peers, "shape")
    return rows


# Issue 15's layer targets: plain W8A8 at least this much faster than bf16 at every shape, and per-head
# in-segments at least this fraction of a plain W8A8 layer's speed at the same shape.
LAYER_SPEEDUP_TARGET = 1.9
IN_SEGMENTS_TARGET = 0.8


def layer_targets(rows: list[dict[str, object]], peers: list[Peer] | None = None) -> list[dict[str, object]]:
    """Met / not met per shape: ``segquant w8a8`` ≥ 1.9× bf16; with peers, faster than each peer and at equal
    or lower error; per-head in-segments (the exact default path) ≥ 0.8× plain ``segquant w8a8``."""
    items: list[dict[str, object]] = []

    def add(target: str, measured: float, limit: str, met: bool) -> None:
        items.append({"target": target, "measured": round(measured, 4), "limit": limit, "met": met})

    for shape in dict.fromkeys(str(r["shape"]) for r in rows):
        by = {str(r["candidate"]): r for r in rows if r["shape"] == shape}
        plain = by.get("segquant w8a8")
        if plain is None:
            continue
        speedup = float(plain["vs_bf16"])  # type: ignore[arg-type]
        add(f"{shape}: w8a8 vs bf16", speedup, f">= {LAYER_SPEEDUP_TARGET}", speedup >= LAYER_SPEEDUP_TARGET)
        for peer in peers or []:
            other = by.get(peer.label)
            if other is None:
                continue
            ratio = float(other["median_ms"]) / float(plain["median_ms"])  # type: ignore[arg-type]
            add(f"{shape}: w8a8 vs {peer.name} (speed)", ratio, "> 1.0", ratio > 1.0)
            err, peer_err = float(plain["rel_err"]), float(other["rel_err"])  # type: ignore[arg-type]
            add(f"{shape}: w8a8 rel_err vs {peer.name}'s", err, f"<= {peer_err:.4g}", err <= peer_err)
        exact = next((r for n, r in by.items() if n.startswith("segquant w8a8 seg(in×") and "folded" not in n), None)
        if exact is not None:
            ratio = float(plain["median_ms"]) / float(exact["median_ms"])  # type: ignore[arg-type]
            met = ratio >= IN_SEGMENTS_TARGET
            add(f"{shape}: per-head in-segments vs plain w8a8", ratio, f">= {IN_SEGMENTS_TARGET}", met)
    return items


def cuda_peaks(fns: dict[str, Callable[[], object]]) -> dict[str, int]:
    """``torch.cuda.max_memory_allocated`` over one call of each candidate (reset before each)."""
    peaks = {}
    for name, fn in fns.items():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        peaks[name] = int(torch.cuda.max_memory_allocated())
    return peaks
