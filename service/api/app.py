"""The FastAPI application: routers, middleware, error handlers, and the lifespan that owns the queue.

``create_app(settings)`` builds an app; nothing is created at import. The lifespan opens the queue
(Redis, or the in-process queue without a Redis URL) and, in embedded mode, starts a worker in this
process; on shutdown the worker drains and the Redis pool is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from service import __version__
from service.api.errors import install_error_handlers
from service.api.job_service import JobService
from service.api.middleware import AuthMiddleware, BodyLimitMiddleware, MetricsMiddleware
from service.api.openapi_limits import apply_limits
from service.api.routes import generate, health, jobs, models, openai
from service.api.routes import metrics as metrics_route
from service.api.state import AppState
from service.jobs.local_queue import LocalQueue
from service.jobs.queue import JobQueue, QueueUnavailableError
from service.metrics import get_metrics
from service.registry import Registry
from service.settings import Settings, get_settings

logger = logging.getLogger(__name__)

WEB_DIR = Path(__file__).resolve().parent.parent / "web"  # the playground page (plain HTML/CSS/JS)

DESCRIPTION = """Text-to-image generation with FP and SegQuant-quantized variants side by side.

* `POST /generate` waits for the images (or `Prefer: respond-async` for a 202 + `Location`).
* `POST /jobs` queues a job (`Idempotency-Key` supported); follow it with `GET /jobs/{id}` or the SSE stream
  `GET /jobs/{id}/events`; `DELETE /jobs/{id}` cancels.
* `POST /v1/images/generations` speaks the OpenAI Images API (plus seed/steps/guidance/variant).
* `GET /models` lists every model × variant with state, memory, latency and fidelity.

Errors always come as `{"error": {"message", "type", "param", "code"}}`. When API keys are configured every
route except `/healthz` and `/readyz` needs `Authorization: Bearer <key>`.
"""


def _make_queue(settings: Settings) -> JobQueue:
    q = settings.queue
    if settings.redis_url:
        from service.jobs.redis_queue import RedisQueue

        return RedisQueue(
            settings.redis_url,
            prefix=settings.key_prefix,
            result_ttl_s=q.result_ttl_s,
            idempotency_ttl_s=q.idempotency_ttl_s,
            stream_maxlen=q.stream_maxlen,
        )
    return LocalQueue(result_ttl_s=q.result_ttl_s, idempotency_ttl_s=q.idempotency_ttl_s)


def _start_worker(state: AppState) -> None:
    """Embedded mode: a worker (engine + runner) in this process, on the app's queue."""
    from service.worker.engine import Engine
    from service.worker.runner import Runner

    keys = state.registry.select(state.settings.worker.variants)
    engine = Engine(state.registry, state.settings)
    engine.validate(keys)
    state.runner = Runner(state.queue, engine, state.settings, state.metrics, keys=keys)  # type: ignore[arg-type]
    state.runner_task = asyncio.create_task(state.runner.run(), name="segquant-embedded-worker")


async def _sweep_unserved(jobs: JobService) -> None:
    """Fail queued jobs of variants that no live worker has served for ``queue.unserved_timeout_s``."""
    interval = min(5.0, max(0.1, jobs.settings.queue.unserved_timeout_s / 4))
    while True:
        await asyncio.sleep(interval)
        try:
            failed = await jobs.fail_unserved()
        except QueueUnavailableError:
            continue  # Redis is down: /readyz says so; try again next round
        except Exception:  # keep sweeping whatever happens, but say what went wrong
            logger.exception("unserved-variant sweep failed")
            continue
        if failed:
            logger.warning("failed %d queued job(s) whose variant no live worker serves", len(failed))


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    registry = Registry.from_settings(settings)
    metrics = get_metrics()
    queue = _make_queue(settings)
    state = AppState(
        settings=settings,
        registry=registry,
        queue=queue,
        jobs=JobService(queue, registry, settings, metrics),
        metrics=metrics,
    )
    app.state.segquant = state
    if settings.embedded:
        _start_worker(state)
    logger.info(
        "SegQuant Serve %s: %s mode, models %s",
        __version__,
        "embedded" if settings.embedded else "api-only",
        ", ".join(registry.models),
    )
    sweeper = asyncio.create_task(_sweep_unserved(state.jobs), name="segquant-unserved-sweep")
    try:
        yield
    finally:
        sweeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sweeper
        if state.runner is not None and state.runner_task is not None:
            state.runner.request_stop()
            try:
                await asyncio.wait_for(state.runner_task, timeout=settings.worker.drain_timeout_s + 10)
            except (asyncio.TimeoutError, asyncio.CancelledError):
                state.runner_task.cancel()
            except Exception:
                logger.exception("embedded worker failed")
        await queue.close()


def _publish_limits(app: FastAPI, settings: Settings) -> None:
    """Build the OpenAPI schema with this server's limits and model names in it (once, on first request)."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = apply_limits(build(), settings, Registry.from_settings(settings))
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    metrics = get_metrics()
    app = FastAPI(title="SegQuant Serve", version=__version__, description=DESCRIPTION, lifespan=lifespan)
    app.state.settings = settings
    install_error_handlers(app)
    for router in (generate.router, jobs.router, openai.router, models.router, health.router, metrics_route.router):
        app.include_router(router)
    app.mount("/web", StaticFiles(directory=WEB_DIR), name="web")
    _publish_limits(app, settings)

    @app.get("/", include_in_schema=False)
    async def playground() -> FileResponse:
        return FileResponse(WEB_DIR / "index.html")

    # Added last = outermost: metrics see every answer, auth runs before the body is read.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.limits.max_body_bytes, metrics=metrics)
    if settings.api_keys:
        app.add_middleware(AuthMiddleware, keys=[k.get_secret_value() for k in settings.api_keys], metrics=metrics)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app
