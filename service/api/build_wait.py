"""Jobs and builds, seen from the API: refuse jobs for unbuilt variants of build-on-request models (409), and
tell a queued job that it waits for its variant's build (with the build's progress and ETA)."""

from __future__ import annotations

from service.api.errors import ApiError
from service.api.variant_state import build_route, variant_status
from service.jobs.queue import BuildProgress, JobQueue, QueueUnavailableError
from service.registry import Registry, VariantKey
from service.settings import Settings


async def refuse_if_unbuilt(queue: JobQueue, registry: Registry, settings: Settings, key: VariantKey) -> None:
    """409 for a job whose variant is not built when its model has ``build_on_demand: false``."""
    model = registry.model(key.model)
    if model.build_on_demand or not model.variant(key.variant).quantized:
        return
    try:
        workers = await queue.workers()
    except QueueUnavailableError:
        workers = []
    status = variant_status(registry, settings.cache_dir, workers, key)
    if status.state in ("not_built", "failed"):
        why = f" (its last build failed: {status.reason})" if status.state == "failed" and status.reason else ""
        raise ApiError(
            409,
            f"variant {key} is not built{why} and model {key.model!r} builds only on request: "
            f"POST {build_route(key)}, then retry when GET /models shows it available",
            code="variant_not_built",
            param="variant",
            extra={"build": build_route(key)},
        )


async def build_progress(
    queue: JobQueue, registry: Registry, settings: Settings, key: VariantKey
) -> BuildProgress | None:
    """The variant's build progress while a worker builds it (None otherwise)."""
    try:
        workers = await queue.workers()
    except QueueUnavailableError:
        return None
    status = variant_status(registry, settings.cache_dir, workers, key)
    if status.state != "building":
        return None
    return status.progress or BuildProgress(phase="starting")
