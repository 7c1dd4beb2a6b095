"""A standalone worker process (``segquant worker``): Redis queue + engine + runner, SIGTERM drains.

Its metrics are served on ``worker.metrics_port`` (``--metrics-port``; 0 = off) from this process's own
registry, so Prometheus scrapes every worker directly; the port is advertised in the worker record.
"""

from __future__ import annotations

import asyncio
import logging
import signal

from prometheus_client import start_http_server

from service.jobs.redis_queue import RedisQueue
from service.metrics import get_metrics
from service.registry import Registry, UnknownModelError
from service.settings import Settings
from service.worker.engine import Engine
from service.worker.runner import Runner

logger = logging.getLogger(__name__)


def build_runner(settings: Settings, queue: RedisQueue, *, metrics_port: int | None = None) -> Runner:
    """A runner for the variants this worker serves (all registry variants unless configured)."""
    registry = Registry.from_settings(settings)
    try:
        keys = registry.select(settings.worker.variants)
    except UnknownModelError as e:
        raise ValueError(f"--variants: {e}") from None
    engine = Engine(registry, settings)
    engine.validate(keys)
    return Runner(queue, engine, settings, get_metrics(), keys=keys, metrics_port=metrics_port)


async def _serve(settings: Settings) -> None:
    if not settings.redis_url:
        raise ValueError("a worker needs a Redis URL (--redis-url or SEGQUANT_REDIS_URL)")
    port = settings.worker.metrics_port or None
    if port:
        try:
            start_http_server(port, registry=get_metrics().registry)
            logger.info("worker metrics on :%d/metrics", port)
        except OSError as e:
            logger.warning("cannot serve worker metrics on port %d (%s); continuing without", port, e)
            port = None
    q = settings.queue
    queue = RedisQueue(
        settings.redis_url,
        prefix=settings.key_prefix,
        result_ttl_s=q.result_ttl_s,
        idempotency_ttl_s=q.idempotency_ttl_s,
        stream_maxlen=q.stream_maxlen,
    )
    runner = build_runner(settings, queue, metrics_port=port)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, runner.request_stop)
    try:
        await runner.run()
    finally:
        await queue.close()


def run_worker(settings: Settings) -> int:
    """Run until SIGTERM/SIGINT; returns the exit status."""
    asyncio.run(_serve(settings))
    return 0
