"""The worker's lifecycle: the run loop, stop/drain, the background loops, and admission of deliveries.

Its other concerns live next to it: running one batch and recording each job's outcome
(:mod:`.batch_runner`), reading and reclaiming deliveries (:mod:`.intake`), one call's control, step
callback and progress publishing (:mod:`.call_progress`), background builds (:mod:`.builder`), the
progress watchdog (:mod:`.watchdog`), and the error policy (:mod:`.resilience`: only connection errors are
retried, by type and with capped backoff; every swallowed error is logged once per place and type).

Around it run small tasks: a heartbeat (keeps the held stream entries from being reclaimed, refreshes
the worker's advertisement), a cancel poll (flags jobs whose cancellation was requested) and a build
request poll. The pipeline call runs in a thread; its step callback only touches thread-safe state and
hands progress to the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from typing import Any, Literal

from service.build_requests import build_requests_for
from service.jobs.model import FailureReason, JobState
from service.jobs.queue import Delivery, WorkerInfo, WorkerQueue
from service.metrics import Metrics
from service.registry import VariantKey
from service.settings import Settings
from service.worker.batch_runner import BatchItem, BatchRunner
from service.worker.batching import group_compatible
from service.worker.builder import BuildManager
from service.worker.engine import BuildOutcome, Engine, LoadedVariant, build_route
from service.worker.fidelity import psnr_of
from service.worker.intake import Intake
from service.worker.resilience import Backoff, SwallowedErrors, is_connection_error, retry_connection
from service.worker.watchdog import Watchdog

logger = logging.getLogger(__name__)


def default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:4]}"


class Runner:
    """One worker: serves ``keys`` from ``queue`` with ``engine``."""

    def __init__(
        self,
        queue: WorkerQueue,
        engine: Engine,
        settings: Settings,
        metrics: Metrics,
        *,
        keys: list[VariantKey],
        worker_id: str | None = None,
        metrics_port: int | None = None,
    ) -> None:
        self.queue, self.engine, self.settings, self.metrics = queue, engine, settings, metrics
        self.keys = keys
        self.worker_id = worker_id or settings.worker.id or default_worker_id()
        self.metrics_port = metrics_port
        self.state: Literal["starting", "ready", "draining"] = "starting"
        self.started_at = time.time()
        self._held: dict[str, Delivery] = {}  # entry id → delivery, refreshed by the heartbeat
        self._stopping = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.builds = BuildManager(engine, build_requests_for(queue), self._build_done)
        self.intake = Intake(
            queue,
            settings,
            keys,
            self.worker_id,
            loaded=engine.loaded_keys,
            building=self.builds.active,
            stopping=self._stopping,
        )
        self.watchdog = Watchdog(settings.worker.step_timeout_s)
        self.errors = SwallowedErrors(logger)  # best-effort writes: each failure logged once per place and type
        self._loop_backoff = Backoff()
        self.batches = BatchRunner(
            queue,
            engine,
            settings,
            metrics,
            worker_id=self.worker_id,
            watchdog=self.watchdog,
            errors=self.errors,
            held=self._held,
            load=self._load,
            advertise=self._advertise,
            wait_for_build=self._wait_for_build,
        )

    # ------------------------------------------------------------------ lifecycle
    async def run(self) -> None:
        """Serve until :meth:`request_stop`; then finish or hand back what is held, and withdraw."""
        self._loop = asyncio.get_running_loop()
        await self._with_retry(lambda: self.queue.prepare(self.keys))
        tasks = [
            asyncio.create_task(self._heartbeat_loop()),
            asyncio.create_task(self._cancel_loop()),
            asyncio.create_task(self._build_request_loop()),
            asyncio.create_task(self.watchdog.run(self._stopping)),
        ]
        try:
            await self._with_retry(self._advertise)
            await self._preload()
            self.state = "ready"
            await self._with_retry(self._advertise)
            logger.info("worker %s ready: serving %s", self.worker_id, ", ".join(map(str, self.keys)))
            while not self._stopping.is_set():
                try:
                    deliveries = await self.intake.next()
                    if deliveries:
                        await self._process(deliveries)
                except Exception as e:  # never let one bad iteration (or a Redis outage) kill the worker
                    if is_connection_error(e):
                        delay = self._loop_backoff.next()
                        logger.warning("queue unavailable (%s: %s); retrying in %.1fs", type(e).__name__, e, delay)
                    else:
                        delay = 1.0
                        logger.exception("worker loop error; retrying in 1s")
                    await self._sleep_or_stop(delay)
                else:
                    self._loop_backoff.reset()
        finally:
            self.state = "draining"
            await self._release_held()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.builds.stop()
            with self.errors.swallow("withdrawing from the queue"):
                await self.queue.forget_consumer(self.keys, self.worker_id)
                await self.queue.withdraw(self.worker_id)
            logger.info("worker %s stopped", self.worker_id)

    def request_stop(self, drain_timeout_s: float | None = None) -> None:
        """Stop taking jobs; the running batch may finish within the drain timeout, then it is handed back."""
        if self._stopping.is_set():
            return
        timeout = self.settings.worker.drain_timeout_s if drain_timeout_s is None else drain_timeout_s
        logger.info("worker %s draining (up to %.0fs for the running batch)", self.worker_id, timeout)
        self.state = "draining"
        self._stopping.set()
        if self._loop is not None:
            self._loop.call_later(timeout, self._hand_back_running)

    def _hand_back_running(self) -> None:
        for control in self.batches.controls:
            control.handback.set()

    async def _sleep_or_stop(self, seconds: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), timeout=seconds)

    async def _with_retry(self, fn: Callable[[], Any]) -> Any:
        """Retry ``fn`` while the queue is unreachable (by error type, capped backoff); other errors propagate."""
        return await retry_connection(fn, stopping=self._stopping, what=f"worker {self.worker_id}")

    async def _preload(self) -> None:
        wanted = self.settings.worker.preload
        if wanted is None:  # the first served model's default variant; the other models load on demand
            first = self.engine.registry.model(self.keys[0].model) if self.keys else None
            keys = [VariantKey(first.name, first.default_variant or "")] if first else []
        else:
            keys = self.engine.registry.select(wanted)
        for key in [k for k in keys if k in self.keys]:
            if self._stopping.is_set():
                return
            if not self.engine.is_built(key):
                if self.engine.registry.model(key.model).build_on_demand:
                    self.builds.start(key, "preload")
                continue
            try:
                await self._load(key)
            except Exception as e:  # the failure is in the variant's status; keep serving the others
                logger.warning("preloading %s failed: %s", key, e)

    async def _load(self, key: VariantKey) -> LoadedVariant:
        already = key in self.engine.loaded_keys()
        lv = await asyncio.to_thread(self.engine.load, key)
        if not already:
            if self.settings.worker.warmup:  # first-call costs (text encoder, kernel setup) are not a job's
                try:
                    await asyncio.to_thread(self.engine.warmup, lv)
                except Exception as e:  # warm-up runs the pipeline, which may raise anything; still serve it
                    logger.warning("warm-up of %s failed (%s); serving it anyway", key, e)
            m = self.metrics
            m.model_load.labels(key.model, key.variant).observe(lv.load_seconds)
            self._set_psnr_gauge(key)
            m.model_weight_bytes.labels(key.model, key.variant).set(lv.weight_bytes)
            m.variant_info.labels(key.model, key.variant, lv.spec.recipe, lv.precision, lv.device).set(1)
            m.models_loaded.set(len(self.engine.loaded_keys()))
            with self.errors.swallow("advertising"):
                await self._advertise()
        return lv

    # ------------------------------------------------------------------ background tasks
    def _info(self) -> WorkerInfo:
        return WorkerInfo(
            id=self.worker_id,
            host=socket.gethostname(),
            pid=os.getpid(),
            device=self.engine.device,
            state=self.state,
            started_at=self.started_at,
            metrics_port=self.metrics_port,
            variants={str(k): self.engine.status(k) for k in self.keys},
            running=self.batches.running,
        )

    async def _advertise(self) -> None:
        ttl = max(3 * self.settings.queue.heartbeat_interval_s, 2.0)
        await self.queue.advertise(self._info(), ttl)

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.queue.heartbeat_interval_s)
            try:
                lost = await self.queue.refresh(list(self._held.values()), self.worker_id)
                for entry in lost:
                    d = self._held.pop(entry, None)  # no longer ours to refresh or hand back
                    logger.warning(
                        "job %s was reclaimed by another worker (this one looked dead); "
                        "whichever finishes first records the result",
                        d.job_id if d else entry,
                    )
                await self._advertise()
            except Exception as e:  # a dead heartbeat task would get held jobs reclaimed: keep beating
                self.errors.record("heartbeat", e)

    async def _cancel_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.worker.cancel_poll_s)
            controls = list(self.batches.controls)
            ids = [j for c in controls for j in c.job_ids]
            if not ids:
                continue
            try:
                canceled = await self.queue.cancel_requested(ids)
            except Exception as e:  # a dead poll task would ignore cancels: the next poll asks again
                self.errors.record("cancel poll", e)
                continue
            for c in controls:
                with c.lock:
                    c.canceled |= canceled & set(c.job_ids)

    # ------------------------------------------------------------------ builds
    async def _build_request_loop(self) -> None:
        """Start the builds asked for with ``POST /models/{model}/variants/{variant}/build``."""
        while True:
            await asyncio.sleep(self.settings.queue.heartbeat_interval_s)
            if self._stopping.is_set():
                return
            try:
                await self.builds.poll_requests(self.keys)
            except Exception as e:  # Redis away: the next round asks again
                self.errors.record("build request poll", e)

    async def _wait_for_build(self, it: BatchItem) -> None:
        """A job whose variant has no artifact: start (or join) its build and put the job back in the queue.

        A failed build fails the job with its reason (``POST …/build`` starts it again); with the model's
        ``build_on_demand: false`` the job fails at once, naming the build route.
        """
        key, job = it.delivery.key, it.job
        route = build_route(key)
        error = self.engine.build_error(key)
        if error is not None:
            await self.batches.fail(it, FailureReason.MODEL_UNAVAILABLE, f"variant {key}: {error} ({route} retries it)")
            return
        if not self.engine.registry.model(key.model).build_on_demand:
            await self.batches.fail(
                it,
                FailureReason.MODEL_UNAVAILABLE,
                f"variant {key} is not built and this model builds only on request: {route} "
                f"(or `segquant quantize` into {self.engine.artifact_dir(key)})",
            )
            return
        if self.builds.start(key, f"job {job.id} needs it"):
            with self.errors.swallow("advertising"):
                await self._advertise()
        await self.queue.release(it.delivery, self.worker_id)
        self._held.pop(it.delivery.entry_id, None)
        logger.info("job %s waits in the queue for the build of %s", job.id, key)

    async def _build_done(self, key: VariantKey, outcome: BuildOutcome | None, error: BaseException | None) -> None:
        """After a build: clear its request, record metrics, advertise the new state (waiting jobs are read)."""
        canceled = error is not None and self._stopping.is_set()
        if not canceled:
            with self.errors.swallow("clearing a build request"):
                await self.builds.requests.clear(key)
        if outcome is not None:
            if outcome.built_here:
                self.metrics.model_build.labels(key.model, key.variant).observe(outcome.seconds)
            self._set_psnr_gauge(key)
            logger.info(
                "build of %s finished in %.1fs (%s); its queued jobs run now",
                key,
                outcome.seconds,
                "built here" if outcome.built_here else "built by another worker",
            )
        elif error is not None and not canceled:
            logger.warning("build of %s failed: %s; its queued jobs fail with that reason", key, error)
        with self.errors.swallow("advertising"):
            await self._advertise()

    def _set_psnr_gauge(self, key: VariantKey) -> None:
        path = self.engine.registry.eval_report_path(key, self.settings.cache_dir)
        try:
            report = json.loads(path.read_text()) if path.is_file() else None
        except (OSError, ValueError) as e:
            logger.warning("unreadable eval report %s: %s", path, e)
            return
        psnr = psnr_of(report)
        if psnr is not None:
            self.metrics.variant_psnr.labels(key.model, key.variant).set(psnr)

    # ------------------------------------------------------------------ admission
    async def _process(self, deliveries: list[Delivery]) -> None:
        for d in deliveries:
            self._held[d.entry_id] = d
        try:
            items: list[BatchItem] = []
            for d in deliveries:
                item = await self._admit(d)
                if item is not None:
                    items.append(item)
            batches = group_compatible(
                items,
                key=lambda it: it.job.params.batch_key(),
                size=lambda it: it.job.params.n,
                max_images=self.settings.worker.max_batch_size,
            )
            for batch in batches:
                if self._stopping.is_set():
                    break  # draining: what was read but not started is handed back below
                await self.batches.run(batch)
        finally:
            await self._release_held()

    async def _admit(self, d: Delivery) -> BatchItem | None:
        """Skip finished jobs, dead-letter over-delivered ones; the rest are started just before their batch."""
        key = d.key
        job = await self.queue.get(d.job_id)
        if job is None or job.state.terminal:
            await self.batches.ack(d)
            return None
        if not self.engine.is_built(key):
            await self._wait_for_build(BatchItem(d, job))
            return None
        if d.deliveries > 1:
            self.metrics.redeliveries.labels(key.model, key.variant).inc()
        if d.deliveries > self.settings.queue.max_deliveries:
            message = (
                f"delivered {d.deliveries} times and its worker died each time (limit "
                f"{self.settings.queue.max_deliveries}); moved to the dead-letter stream"
            )
            written = await self.queue.dead_letter(d, message)
            self._held.pop(d.entry_id, None)
            self.metrics.dead_lettered.labels(key.model, key.variant).inc()
            if written:
                self.batches.count_terminal(key, JobState.FAILED, FailureReason.WORKER_LOST.value)
            logger.error("job %s dead-lettered: %s", d.job_id, message)
            return None
        return BatchItem(d, job)

    async def _release_held(self) -> None:
        """Hand back entries read but not finished (drain, or an error between read and run)."""
        for d in list(self._held.values()):
            try:
                await self.queue.release(d, self.worker_id)
            except Exception as e:  # leave it pending: the reclaim path will pick it up
                self.errors.record(f"handing back job {d.job_id}", e)
            self._held.pop(d.entry_id, None)
