"""``GET /metrics``: this process's collectors in the Prometheus text format.

Queue depth, capacity and live workers are read from the queue at scrape time. In Redis mode the job
histograms live in the workers; scrape each worker's ``--metrics-port`` as well (see docs/service.md).
"""

from __future__ import annotations

import contextlib

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.api.deps import StateDep
from service.jobs.queue import QueueUnavailableError

router = APIRouter(tags=["metrics"])


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(state: StateDep) -> Response:
    m = state.metrics
    m.queue_capacity.set(state.settings.queue.max_depth)
    with contextlib.suppress(QueueUnavailableError):
        for key, depth in (await state.queue.depths(state.registry.variant_keys())).items():
            m.queue_depth.labels(key.model, key.variant).set(depth)
        m.workers_alive.set(len(await state.queue.workers()))
    return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)
