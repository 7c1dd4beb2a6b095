"""A variant's state as the API sees it: the live workers' advertisements merged, else the artifact on disk.

Used by ``GET /models``, the build route, and job views (a queued job whose variant is building waits for
the build, with its ETA). Torch-free.
"""

from __future__ import annotations

from pathlib import Path

from service.jobs.queue import VariantStatus, WorkerInfo
from service.registry import Registry, VariantKey

MANIFEST = "manifest.json"
_RANK = {"loaded": 4, "building": 3, "available": 2, "not_built": 1, "failed": 0}


def merge(statuses: list[VariantStatus]) -> VariantStatus | None:
    """The most advanced state any worker reports; a build with real progress beats one waiting for its lock."""
    if not statuses:
        return None

    def rank(s: VariantStatus) -> tuple[int, int]:
        progressing = s.progress is not None and not s.progress.phase.startswith("waiting")
        return _RANK[s.state], int(progressing)

    best = max(statuses, key=rank).model_copy()
    peaks = [s.peak_memory_bytes for s in statuses if s.peak_memory_bytes]
    best.peak_memory_bytes = max(peaks) if peaks else None
    best.weight_bytes = best.weight_bytes or next((s.weight_bytes for s in statuses if s.weight_bytes), None)
    if best.shared_bytes is None:  # 0 is a real figure (a model without shared modules)
        best.shared_bytes = next((s.shared_bytes for s in statuses if s.shared_bytes is not None), None)
    return best


def reports(workers: list[WorkerInfo], key: VariantKey) -> list[VariantStatus]:
    return [w.variants[str(key)] for w in workers if str(key) in w.variants]


def variant_status(registry: Registry, cache_dir: Path, workers: list[WorkerInfo], key: VariantKey) -> VariantStatus:
    """Merged worker reports, or (no live worker serves it) whether its artifact exists on this host."""
    spec = registry.model(key.model).variant(key.variant)
    merged = merge(reports(workers, key))
    if merged is not None:
        return merged
    built = not spec.quantized or (registry.artifact_dir(key, cache_dir) / MANIFEST).is_file()
    return VariantStatus(state="available" if built else "not_built", recipe=spec.recipe)


def build_route(key: VariantKey) -> str:
    return f"/models/{key.model}/variants/{key.variant}/build"
