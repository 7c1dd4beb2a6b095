"""Liveness (``/healthz``: the process answers) and readiness (``/readyz``: a worker with a loaded model is
alive and the queue accepts jobs). Both stay open when API keys are configured."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from service.api.deps import StateDep
from service.jobs.queue import QueueUnavailableError

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Liveness: the process is up")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="Readiness: a worker holds a model and the queue accepts jobs")
async def readyz(state: StateDep) -> JSONResponse:
    problems: list[str] = []
    workers = []
    depth = None
    try:
        await state.queue.ping()
        depth = await state.queue.total_depth()
        workers = await state.queue.workers()
    except QueueUnavailableError as e:
        problems.append(f"queue unavailable: {e}")
    ready = [w for w in workers if w.state == "ready" and w.loaded]
    if not problems and not ready:
        failed = sorted({f"{k}: {v.reason}" for w in workers for k, v in w.variants.items() if v.state == "failed"})
        problems.append("no live worker has a model loaded yet" + (f" (failed: {'; '.join(failed)})" if failed else ""))
    task = state.runner_task
    if task is not None and task.done():
        error = None if task.cancelled() else task.exception()
        problems.append(f"the embedded worker stopped: {error!r}")
    capacity = state.settings.queue.max_depth
    if depth is not None and depth >= capacity:
        problems.append(f"the queue is full ({depth}/{capacity})")
    body = {
        "status": "ready" if not problems else "not_ready",
        "problems": problems,
        "workers": [{"id": w.id, "state": w.state, "loaded": w.loaded} for w in workers],
        "queue_depth": depth,
        "queue_capacity": capacity,
        "mode": "embedded" if state.runner else "redis",
    }
    return JSONResponse(body, status_code=200 if not problems else 503)
