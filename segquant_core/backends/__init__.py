"""Execution backends for SegLinear, and the automatic choice between them.

Order of preference (first one that accepts a layer wins; ``reference`` accepts everything):

=========  ====================================================================
CPU        ``cpu-onednn-int8`` (int8/int4 weights, int8 activations), ``scaled-mm-fp8``, ``int-mm``
CUDA       ``triton-fused`` (fused quantize + int8 GEMM + segment/dual scales, static int8 activations),
           ``int-mm`` (cuBLAS int8), ``scaled-mm-fp8`` (sm_89+)
any        ``reference`` (fake quantization in fp32: always correct, never fast)
=========  ====================================================================

``triton-fused`` also runs on CPU under Triton's interpreter (``TRITON_INTERPRET=1``), which is how the tests
check it; it is never chosen automatically on CPU.
"""

from __future__ import annotations

import logging
from collections import Counter

from torch import nn

from segquant_core.backends.base import Backend
from segquant_core.backends.cpu_onednn import OneDNNInt8Backend
from segquant_core.backends.int_mm import IntMMBackend
from segquant_core.backends.reference import ReferenceBackend
from segquant_core.backends.scaled_mm import ScaledMMFp8Backend
from segquant_core.backends.triton_fused import TritonFusedBackend

logger = logging.getLogger(__name__)

_REGISTRY: dict[str, type[Backend]] = {
    b.name: b for b in (OneDNNInt8Backend, IntMMBackend, ScaledMMFp8Backend, TritonFusedBackend, ReferenceBackend)
}
_AUTO_ORDER = {
    "cpu": ["cpu-onednn-int8", "scaled-mm-fp8", "int-mm", "reference"],
    "cuda": ["triton-fused", "int-mm", "scaled-mm-fp8", "reference"],
}


def backend_names() -> list[str]:
    return [*_REGISTRY, "auto"]


def get_backend(name: str) -> Backend:
    if name not in _REGISTRY:
        raise ValueError(f"unknown backend {name!r}; expected one of: {', '.join(backend_names())}")
    return _REGISTRY[name]()


def select_backend(layer: nn.Module, prefer: str = "auto") -> Backend:
    """The backend that will run ``layer``: ``prefer`` if it can, else the best available."""
    if prefer != "auto":
        backend = get_backend(prefer)
        reason = backend.unsupported_reason(layer)  # type: ignore[arg-type]
        if reason:
            raise ValueError(f"backend {prefer!r} cannot run this layer: {reason}")
        return backend
    device = getattr(layer, "device", None) or next(iter(layer.buffers())).device
    device = device.type
    for name in _AUTO_ORDER.get(device, ["reference"]):
        cls = _REGISTRY[name]
        if cls.available() and cls().unsupported_reason(layer) is None:  # type: ignore[arg-type]
            return cls()
    return ReferenceBackend()


def assign_backends(model: nn.Module, prefer: str = "auto") -> dict[str, int]:
    """Choose (and prepare) a backend for every SegLinear in ``model``; log the tally once."""
    from segquant_core.seglinear import SegLinear

    tally: Counter[str] = Counter()
    for module in model.modules():
        if isinstance(module, SegLinear):
            backend = select_backend(module, prefer)
            module.set_backend(backend)
            tally[backend.name] += 1
    if tally:
        logger.info(
            "segquant backends for %s: %s",
            type(model).__name__,
            ", ".join(f"{n} × {name}" for name, n in tally.most_common()),
        )
    return dict(tally)


__all__ = ["Backend", "assign_backends", "backend_names", "get_backend", "select_backend"]
