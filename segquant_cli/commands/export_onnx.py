"""``segquant export-onnx ARTIFACT_DIR --out model.onnx``: the quantized denoiser as an ONNX QDQ graph.

The float model comes from the artifact's ``source.path`` (or ``--model``), the artifact is loaded into it
and the result is exported with explicit QuantizeLinear/DequantizeLinear pairs (ONNX Runtime; TensorRT
explicit quantization — see docs/onnx.md). ``--check`` then runs the file with ONNX Runtime on the export
inputs and prints its relative error against our reference backend and both latencies.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from segquant_cli.errors import CLIError
from segquant_cli.models import load_denoiser


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export-onnx",
        help="export a quantized denoiser as an ONNX QDQ graph",
        description="Load an artifact into its float model and export it as ONNX with explicit "
        "Q/DQ nodes (ONNX Runtime, TensorRT). Shapes are static: those of the example.",
    )
    p.add_argument("artifact", help="artifact directory written by `segquant quantize`")
    p.add_argument("--out", required=True, help="ONNX file to write (written via a temporary file)")
    p.add_argument("--model", help="float model / pipeline directory (default: the artifact's source.path)")
    p.add_argument("--component", choices=["transformer", "unet"], help="which denoiser of a pipeline")
    p.add_argument("--opset", type=int, help="ONNX opset (default: 18; 19 with fp8, 21 with int4 weights)")
    p.add_argument(
        "--example-size",
        metavar="HxW",
        help="latent height x width of the export inputs (default: the model's sample_size)",
    )
    p.add_argument("--batch", type=int, default=2, help="batch of the export inputs (default 2: a CFG pair)")
    p.add_argument(
        "--exporter",
        choices=["dynamo", "torchscript"],
        default="dynamo",
        help="torch exporter for the float part (default dynamo; torchscript is faster, no Flux)",
    )
    p.add_argument(
        "--dynamic-activations",
        action="store_true",
        help="export dynamic (per-token) activation quantizers as in-graph scale computations "
        "(runs in ONNX Runtime; TensorRT needs constant scales)",
    )
    p.add_argument(
        "--check",
        action="store_true",
        help="run the graph with ONNX Runtime: relative error vs our reference backend, latencies",
    )
    p.add_argument("--rounds", type=int, default=10, help="timed rounds per side for --check (default 10)")
    p.add_argument(
        "--compile",
        action="store_true",
        help="with --check: also time our denoiser under torch.compile against ONNX Runtime",
    )
    p.add_argument("--tolerance", type=float, default=1e-2, help="max relative error for --check (default 1e-2)")
    p.add_argument("--threads", type=int, help="intra-op threads for both sides of --check (default: torch's)")
    p.add_argument("--json", help="also write the export (and check) summary as JSON here")
    p.set_defaults(run=run)


def parse_size(text: str | None) -> tuple[int | None, int | None]:
    if not text:
        return None, None
    h, sep, w = text.lower().partition("x")
    if not sep or not h.strip().isdigit() or not w.strip().isdigit():
        raise CLIError(f"--example-size must look like HxW (e.g. 32x32), got {text!r}")
    return int(h), int(w)


def _default_size(model: Any) -> tuple[int | None, int | None]:
    """The model's own sample_size (its native latent resolution), where its config has one."""
    size = getattr(getattr(model, "config", None), "sample_size", None)
    if isinstance(size, int) and size > 0:
        return size, size
    if isinstance(size, (tuple, list)) and len(size) == 2:
        return int(size[0]), int(size[1])
    return None, None


def run(args: argparse.Namespace) -> int:
    try:
        from segquant_core.export.check import check_onnx
        from segquant_core.export.exporter import export_onnx
    except ImportError as e:
        raise CLIError(f"export-onnx needs the onnx extra (pip install 'segquant-serve[onnx]'): {e}") from None
    import segquant_core as sq
    from segquant_core.detect import example_inputs_for

    if args.batch < 1:
        raise CLIError("--batch must be ≥ 1")
    if args.rounds < 1:
        raise CLIError("--rounds must be ≥ 1")
    if args.compile and not args.check:
        raise CLIError("--compile needs --check (it times the compiled denoiser against ONNX Runtime)")
    if args.threads is not None and args.threads < 1:
        raise CLIError("--threads must be ≥ 1")
    height, width = parse_size(args.example_size)
    artifact = Path(args.artifact)
    manifest = sq.read_manifest(artifact)
    source = manifest.get("source", {})
    model_path = args.model or source.get("path")
    if not model_path:
        raise CLIError(f"{artifact}: the manifest names no source.path; pass --model MODEL_DIR")
    model, _ = load_denoiser(
        model_path, args.component or source.get("component"), tuple(source.get("drop_components") or ())
    )
    if source.get("class") and source["class"] != type(model).__name__:
        raise CLIError(f"{artifact} was made for a {source['class']}, but {model_path} holds a {type(model).__name__}")
    sq.load(artifact, model)
    model.eval()
    if height is None:
        height, width = _default_size(model)
    try:
        kwargs = example_inputs_for(model, batch=args.batch, height=height, width=width)
    except ValueError as e:
        raise CLIError(f"--example-size: {e}") from None
    result = export_onnx(
        model, kwargs, args.out, opset=args.opset, exporter=args.exporter, allow_dynamic=args.dynamic_activations
    )
    s = result.summary()
    print(
        f"wrote {s['path']} ({s['bytes'] / 1e6:.2f} MB, opset {s['opset']}, {s['exporter']} exporter, {s['seconds']} s)"
    )
    print(f"  inputs: {', '.join(f'{n}{list(t.shape)}' for n, t in zip(result.input_names, _leaves(kwargs)))}")
    print(
        f"  quantized layers: {s['quantized_layers']}; QuantizeLinear {s['QuantizeLinear']}, "
        f"DequantizeLinear {s['DequantizeLinear']}, MatMul {s['MatMul']}"
    )
    for note in s["notes"]:
        print(f"  note: {note}")
    out: dict[str, Any] = {"export": s}
    status = 0
    if args.check:
        rep = check_onnx(
            model,
            kwargs,
            result.path,
            rounds=args.rounds,
            tolerance=args.tolerance,
            threads=args.threads,
            compile=args.compile,
        )
        print(f"check (ONNX Runtime {rep.ort_version}, {rep.provider}, threads: {rep.threads}):")
        print(
            f"  rel. error vs reference backend: {rep.rel_error:.3e} (tolerance {rep.tolerance:g}) "
            f"{'OK' if rep.passed else 'FAILED'}"
        )
        print(
            f"  rel. error vs our CPU backend:   {rep.rel_error_vs_backend:.3e} "
            f"(backend vs reference {rep.backend_vs_reference:.3e})"
        )
        backends = ", ".join(f"{k}×{v}" for k, v in rep.backends.items())
        print(
            f"  latency, median of {rep.rounds} alternating rounds: ONNX Runtime {rep.ort_ms:.2f} ms, "
            f"segquant ({backends}) {rep.backend_ms:.2f} ms, ratio {rep.backend_ms / rep.ort_ms:.2f}×"
        )
        if rep.compiled_ms is not None:
            print(
                f"  compiled: segquant {rep.compiled_ms:.2f} ms, ratio {rep.compiled_ms / rep.ort_ms:.2f}× "
                f"(compiled vs eager output {rep.compiled_vs_backend:.1e})"
            )
        native_ms = min(rep.backend_ms, rep.compiled_ms if rep.compiled_ms is not None else rep.backend_ms)
        met = native_ms <= rep.ort_ms  # issue 15: our native path at least as fast as ORT on our own export
        print(f"  target (issue 15), native path at least as fast as ONNX Runtime: {'met' if met else 'not met'}")
        out["check"] = rep.to_dict()
        out["check"]["target_native_as_fast_as_ort"] = met
        if not rep.passed:
            print(f"segquant: check failed: relative error {rep.rel_error:.3e} ≥ {rep.tolerance:g}", file=sys.stderr)
            status = 1
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return status


def _leaves(kwargs: dict[str, Any]) -> list[Any]:
    from segquant_core.export.exporter import flatten_inputs

    return flatten_inputs(kwargs)[1]
