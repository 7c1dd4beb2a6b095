"""Run an exported graph with ONNX Runtime next to our own backends: relative error and latency.

The error is measured against the reference backend (fake quantization in fp32, the ground truth every
backend is held to) on the very inputs the graph was exported with; the latency compares ONNX Runtime's CPU
execution provider with our CPU backend (``auto``: oneDNN int8 where it applies) in alternating rounds, so
that background load hits both alike, and reports medians. It is a measurement, not a pass/fail timing.

ONNX Runtime fuses ``DequantizeLinear(int4) → MatMul`` into ``MatMulNBits`` and by default computes it with
int8 activations (``session.qdq_matmulnbits_accuracy_level`` 4), which re-quantizes the input a second time;
the check asks for fp32 accumulation (level 1) so that it measures the graph, not that extra rounding.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from segquant_core.export.exporter import flatten_inputs
from segquant_core.seglinear import SegLinear

DEFAULT_TOLERANCE = 1e-2


@dataclass
class CheckReport:
    """ONNX Runtime vs our backends on one set of inputs."""

    rel_error: float  # ORT vs reference backend: ‖y_ort − y_ref‖ / ‖y_ref‖
    rel_error_vs_backend: float  # ORT vs our CPU backend
    backend_vs_reference: float  # our CPU backend vs reference (for scale)
    tolerance: float
    ort_ms: float  # median over rounds
    backend_ms: float
    rounds: int
    threads: int
    backends: dict[str, int]
    ort_version: str
    provider: str
    compiled_ms: float | None = None  # our backend under torch.compile, alternated with ORT (compile=True)
    compiled_vs_backend: float | None = None  # compiled vs eager output of our backend (rounding level)

    @property
    def passed(self) -> bool:
        return bool(self.rel_error < self.tolerance)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}


def rel_error(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    denom = float(np.linalg.norm(b64))
    return float(np.linalg.norm(a64 - b64) / denom) if denom > 0 else float(np.linalg.norm(a64))


def ort_session(path: str | Path, threads: int | None = None) -> Any:
    """A CPU ONNX Runtime session; int4 MatMuls accumulate in fp32 (see module docstring)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _first(out: Any) -> torch.Tensor:
    if isinstance(out, (tuple, list)):
        return out[0]
    return out.sample if hasattr(out, "sample") else out


def check_onnx(
    model: nn.Module,
    example_kwargs: dict[str, Any],
    onnx_path: str | Path,
    *,
    rounds: int = 5,
    tolerance: float = DEFAULT_TOLERANCE,
    threads: int | None = None,
    backend: str = "auto",
    compile: bool = False,
    compile_backend: str = "inductor",
) -> CheckReport:
    """Compare the ONNX graph at ``onnx_path`` with ``model`` (quantized, SegLinear layers) on ``example_kwargs``.

    ``threads`` defaults to torch's intra-op thread count, used for both sides. ``compile``: also time our
    backend under ``torch.compile`` (a second alternation against ORT; the model is uncompiled afterwards), since
    the compiled denoiser is our native path too. The model's backends are restored afterwards.
    """
    import onnxruntime as ort

    from segquant_core.backends import assign_backends
    from segquant_core.backends.reference import ReferenceBackend

    if rounds < 1:
        raise ValueError("rounds must be ≥ 1")
    threads = threads or torch.get_num_threads()
    layers = [m for m in model.modules() if isinstance(m, SegLinear)]
    saved = [m._backend for m in layers]
    names, tensors = flatten_inputs(example_kwargs)
    feeds = {n: t.detach().cpu().numpy() for n, t in zip(names, tensors)}
    session = ort_session(onnx_path, threads)
    wanted = {i.name for i in session.get_inputs()}
    if wanted - set(feeds):
        raise ValueError(f"the graph wants inputs {sorted(wanted - set(feeds))} that the example inputs lack")
    feeds = {k: v for k, v in feeds.items() if k in wanted}
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            for m in layers:
                m.set_backend(ReferenceBackend())
            y_ref = _first(model(**example_kwargs)).float().numpy()
            tally = assign_backends(model, backend)
            y_backend = _first(model(**example_kwargs)).float().numpy()
            y_ort = session.run(None, feeds)[0]

            def run_ort() -> float:
                t = time.perf_counter()
                session.run(None, feeds)
                return time.perf_counter() - t

            def run_backend() -> float:
                t = time.perf_counter()
                model(**example_kwargs)
                return time.perf_counter() - t

            run_ort()
            run_backend()
            ort_times, backend_times = _alternate(run_ort, run_backend, rounds)
            compiled_ms = compiled_vs_backend = None
            if compile:
                from segquant_core.compile import compile_denoiser, uncompile

                compile_denoiser(model, example_kwargs=example_kwargs, backend=compile_backend)
                try:
                    y_compiled = _first(model(**example_kwargs)).float().numpy()
                    compiled_vs_backend = rel_error(y_compiled, y_backend)
                    compiled_times = _alternate(run_ort, run_backend, rounds)[1]
                    compiled_ms = statistics.median(compiled_times) * 1e3
                finally:
                    uncompile(model)
    finally:
        torch.set_num_threads(old_threads)
        for m, b in zip(layers, saved):
            if b is not None:
                m.set_backend(b)
    return CheckReport(
        rel_error=rel_error(y_ort, y_ref),
        rel_error_vs_backend=rel_error(y_ort, y_backend),
        backend_vs_reference=rel_error(y_backend, y_ref),
        tolerance=tolerance,
        ort_ms=statistics.median(ort_times) * 1e3,
        backend_ms=statistics.median(backend_times) * 1e3,
        rounds=rounds,
        threads=threads,
        backends=tally,
        ort_version=ort.__version__,
        provider="CPUExecutionProvider",
        compiled_ms=compiled_ms,
        compiled_vs_backend=compiled_vs_backend,
    )


def _alternate(first: Any, second: Any, rounds: int) -> tuple[list[float], list[float]]:
    """Seconds of ``first()`` and ``second()`` over ``rounds``, alternating who goes first (drifting load is
    shared)."""
    a: list[float] = []
    b: list[float] = []
    for r in range(rounds):
        if r % 2:
            b.append(second())
            a.append(first())
        else:
            a.append(first())
            b.append(second())
    return a, b


__all__ = ["DEFAULT_TOLERANCE", "CheckReport", "check_onnx", "ort_session", "rel_error"]
