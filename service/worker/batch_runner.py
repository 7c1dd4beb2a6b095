"""Running one batch of compatible jobs: start them, call the pipeline, record each job's outcome, acknowledge.

Split from the worker's lifecycle (:mod:`.runner`) so that what happens to a batch — and to each of its jobs
when the call succeeds, is stopped, runs out of memory or fails — reads in one place. Everything it needs is
handed in explicitly; the runner keeps the run loop, draining, the background loops and admission.

Order of writes for a job: start (check-and-set) → pipeline → finish (check-and-set, result + terminal
event) → acknowledge. A crash anywhere before the acknowledgement leaves the entry pending, so another
worker reclaims it; the check-and-set makes sure only one completion is recorded.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from service.jobs.model import FailureReason, ImageOut, Job, JobError, JobResult, JobState, Timings
from service.jobs.queue import Delivery, StatsRecord, WorkerQueue
from service.metrics import Metrics
from service.registry import VariantKey
from service.settings import Settings
from service.worker import images as imaging
from service.worker import memory
from service.worker.adapters import AdapterLoadError
from service.worker.call_progress import CallControl, publish_progress, step_callback
from service.worker.engine import ArtifactMissingError, CallStats, Engine, LoadedVariant, Sample, StopBatch
from service.worker.resilience import SwallowedErrors
from service.worker.watchdog import Watchdog

logger = logging.getLogger(__name__)

CANCELED_WHILE_RUNNING = "canceled while running"


@dataclass
class BatchItem:
    """A job together with the stream delivery that must be acknowledged once the job is finished."""

    delivery: Delivery
    job: Job


class BatchRunner:
    """Runs batches for one worker; owns the running calls' controls and the count of running jobs."""

    def __init__(
        self,
        queue: WorkerQueue,
        engine: Engine,
        settings: Settings,
        metrics: Metrics,
        *,
        worker_id: str,
        watchdog: Watchdog,
        errors: SwallowedErrors,
        held: dict[str, Delivery],
        load: Callable[[VariantKey], Awaitable[LoadedVariant]],
        advertise: Callable[[], Awaitable[None]],
        wait_for_build: Callable[[BatchItem], Awaitable[None]],
    ) -> None:
        self.queue, self.engine, self.settings, self.metrics = queue, engine, settings, metrics
        self.worker_id = worker_id
        self.watchdog = watchdog
        self.errors = errors
        self.held = held  # the runner's entry id → delivery map: acknowledged entries leave it
        self._load = load
        self._advertise = advertise
        self._wait_for_build = wait_for_build
        self.controls: list[CallControl] = []  # one per running call: cancel poll and hand-back flag them
        self.running = 0  # jobs in a running call, advertised by the heartbeat

    async def run(self, batch: list[BatchItem], *, alone: bool = False) -> None:
        """Start ``batch`` (unless retried ``alone`` after an OOM) and run it to a terminal state per job."""
        batch = await self._start(batch) if not alone else batch
        if not batch:
            return
        params = batch[0].job.params
        key = VariantKey(params.model, params.variant)
        m = self.metrics
        load_start = time.perf_counter()
        try:
            lv = await self._load(key)
            load_s = time.perf_counter() - load_start  # ~0 unless this batch waited for a load
        except ArtifactMissingError:  # removed since it was admitted: back to the queue, and build it
            for it in batch:
                await self._wait_for_build(it)
            return
        except Exception as e:  # any load failure fails these jobs (each logged by fail()), not the worker
            reason = f"variant {key} could not be loaded: {type(e).__name__}: {e}"
            with self.errors.swallow("advertising"):
                await self._advertise()  # GET /models shows the failed state and its reason before the jobs fail
            for it in batch:
                await self.fail(it, FailureReason.MODEL_UNAVAILABLE, reason)
            return
        hooks = (
            [it.job.params.debug for it in batch if it.job.params.debug is not None]
            if self.settings.debug_hooks
            else []
        )
        ids = [it.job.id for it in batch]
        control = CallControl(
            ids,
            self.watchdog.watch(key, ids),
            crash=any(h.crash_worker for h in hooks),
            hang=any(h.hang_first_attempt for h in hooks) and all(it.job.attempts <= 1 for it in batch),
            step_delay_s=max((h.step_delay_s for h in hooks), default=0.0),
        )
        for it in [] if alone else batch:
            m.queue_wait.labels(key.model, key.variant).observe(
                max(0.0, (it.job.started_at or time.time()) - it.job.created_at)
            )
        progress: asyncio.Queue[tuple[int, int] | None] = asyncio.Queue()
        publisher = asyncio.create_task(publish_progress(self.queue, progress, control, self.errors))
        self.controls.append(control)
        self.running += len(batch)
        m.jobs_running.labels(key.model, key.variant).inc(len(batch))
        loop = asyncio.get_running_loop()
        on_step = step_callback(control, loop, progress)
        retry_alone: list[BatchItem] = []
        try:
            grouped, stats = await asyncio.to_thread(
                self.engine.generate,
                lv,
                [Sample(it.job.params.prompt, it.job.params.negative_prompt, it.job.params.seeds) for it in batch],
                width=params.width,
                height=params.height,
                steps=params.num_inference_steps,
                guidance_scale=params.guidance_scale,
                on_step=on_step,
                adapters=params.adapter_scales(),  # one set per batch: the batch key includes it
            )
        except StopBatch as stop:
            if stop.stalled:
                limit = self.watchdog.limit(key)
                for it in batch:
                    await self.fail(
                        it,
                        FailureReason.STALLED,
                        f"no denoising step for {limit:g} s (worker.step_timeout_s); the call was stopped",
                    )
            else:
                await self._stopped(batch, control, handback=stop.handback)
        except AdapterLoadError as e:  # a registry entry this variant cannot load: its jobs cannot run here
            for it in batch:
                await self.fail(it, FailureReason.MODEL_UNAVAILABLE, str(e))
        except Exception as e:  # the pipeline may raise anything: fail these jobs, keep the worker serving
            if memory.is_oom(e):
                memory.free_memory()
                if len(batch) > 1:
                    logger.warning("batch of %d jobs ran out of memory (%s); retrying them one by one", len(batch), e)
                    retry_alone = list(batch)
                else:
                    await self.fail(batch[0], FailureReason.OOM, f"out of memory: {e}")
            elif isinstance(e, ValueError):
                for it in batch:
                    await self.fail(it, FailureReason.INVALID, str(e))
            else:
                logger.exception("pipeline call failed for %s (jobs %s)", key, ", ".join(ids))
                for it in batch:
                    await self.fail(it, FailureReason.INTERNAL, f"{type(e).__name__}: {e}")
        else:
            await self._succeed(batch, control, lv, grouped, stats, load_s=load_s)
            with self.errors.swallow("advertising"):
                await self._advertise()  # fresh latency/memory figures for GET /models
        finally:
            progress.put_nowait(None)
            await publisher
            self.controls.remove(control)
            self.watchdog.done(control.watch)
            self.running -= len(batch)
            m.jobs_running.labels(key.model, key.variant).dec(len(batch))
        for it in retry_alone:
            await self.run([it], alone=True)

    async def _start(self, batch: list[BatchItem]) -> list[BatchItem]:
        """Mark each job running (check-and-set); jobs canceled or expired meanwhile are acknowledged instead."""
        started: list[BatchItem] = []
        for it in batch:
            outcome = await self.queue.start(it.delivery, self.worker_id)
            if outcome.status == "started" and outcome.job is not None:
                started.append(BatchItem(it.delivery, outcome.job))
                continue
            if outcome.status in ("canceled", "expired"):
                self.count_terminal(it.delivery.key, JobState(outcome.status))
            await self.ack(it.delivery)
        return started

    async def _stopped(self, batch: list[BatchItem], control: CallControl, *, handback: bool) -> None:
        """The call stopped between steps: canceled jobs finish canceled; a drain hands the others back."""
        for it in batch:
            if handback and it.job.id not in control.canceled:
                await self.queue.release(it.delivery, self.worker_id)
                self.held.pop(it.delivery.entry_id, None)
                logger.info("handed job %s back to the queue (worker draining)", it.job.id)
            else:
                await self._finish(
                    it, JobState.CANCELED, error=JobError(reason="canceled", message=CANCELED_WHILE_RUNNING)
                )

    async def _succeed(
        self,
        batch: list[BatchItem],
        control: CallControl,
        lv: LoadedVariant,
        grouped: list[list[Any]],
        stats: CallStats,
        *,
        load_s: float = 0.0,
    ) -> None:
        """Record the call's metrics, then encode and store each job's images (unless it was canceled)."""
        key, m = lv.key, self.metrics
        m.inference.labels(key.model, key.variant).observe(stats.inference_s)
        m.batch_size.labels(key.model, key.variant).observe(stats.images)
        for name in stats.adapters_loaded:
            m.adapter_loads.labels(key.model, name).inc()
        for s in stats.step_seconds:
            m.denoise_step.labels(key.model, key.variant).observe(s)
        self.watchdog.record(key, stats.step_seconds)
        if stats.peak_memory_bytes:
            m.model_peak_memory.labels(key.model, key.variant, stats.memory_kind).set(lv.peak_memory_bytes)
        records: list[StatsRecord] = []
        for it, pil_images in zip(batch, grouped):
            if it.job.id in control.canceled:
                await self._finish(
                    it, JobState.CANCELED, error=JobError(reason="canceled", message=CANCELED_WHILE_RUNNING)
                )
                continue
            p = it.job.params
            encode_start = time.perf_counter()
            images = await asyncio.to_thread(self._encode, it.job, lv, pil_images)
            encode_s = time.perf_counter() - encode_start
            now = time.time()
            started = it.job.started_at or now
            timings = Timings(
                queue_wait_s=round(started - it.job.created_at, 4),
                load_s=round(load_s, 4),
                inference_s=round(stats.inference_s, 4),
                encode_s=round(encode_s, 4),
                total_s=round(now - it.job.created_at, 4),
            )
            result = JobResult(
                images=images,
                timings=timings,
                worker_id=self.worker_id,
                batch_size=stats.images,
                precision=lv.precision,
            )
            if await self._finish(it, JobState.SUCCEEDED, result=result):
                m.images.labels(key.model, key.variant).inc(p.n)
                for adapter in p.loras:
                    m.adapter_jobs.labels(key.model, adapter.name).inc()
                m.job_duration.labels(key.model, key.variant).observe(timings.total_s)
                records.append(
                    StatsRecord(
                        inference_s=stats.inference_s, total_s=timings.total_s, service_s=stats.inference_s / len(batch)
                    )
                )
        with self.errors.swallow("recording job timings"):
            await self.queue.record_stats(key, records)

    @staticmethod
    def _encode(job: Job, lv: LoadedVariant, pil_images: list[Any]) -> list[ImageOut]:
        """Encode one job's images with their generation parameters embedded (runs in a thread)."""
        p = job.params
        out = []
        for seed, image in zip(p.seeds, pil_images):
            meta = {
                "prompt": p.prompt,
                "negative_prompt": p.negative_prompt,
                "seed": seed,
                "model": p.model,
                "variant": p.variant,
                "recipe": lv.spec.recipe,
                "steps": p.num_inference_steps,
                "guidance_scale": p.guidance_scale,
                "width": p.width,
                "height": p.height,
                "loras": [a.model_dump() for a in p.loras],
                "job_id": job.id,
            }
            out.append(
                ImageOut(
                    b64_json=imaging.encode_b64(image, p.output_format, meta),
                    seed=seed,
                    format=p.output_format,
                    width=image.width,
                    height=image.height,
                )
            )
        return out

    async def fail(self, it: BatchItem, reason: FailureReason, message: str) -> None:
        """Finish ``it`` as failed with ``reason``; the one log line for that job's failure."""
        logger.warning("job %s failed (%s): %s", it.job.id, reason.value, message)
        await self._finish(it, JobState.FAILED, error=JobError(reason=reason.value, message=message))

    async def _finish(
        self, it: BatchItem, state: JobState, *, result: JobResult | None = None, error: JobError | None = None
    ) -> bool:
        """Record the terminal state (check-and-set, so a reclaimed duplicate does not count) and acknowledge."""
        key = it.delivery.key
        written = await self.queue.finish(it.job.id, state, result=result, error=error, worker_id=self.worker_id)
        if written:
            self.count_terminal(key, state, error.reason if error and state is JobState.FAILED else None)
        else:
            self.metrics.duplicate_completions.labels(key.model, key.variant).inc()
            logger.info("job %s had already finished elsewhere; this completion was not recorded", it.job.id)
        await self.ack(it.delivery)
        return written

    async def ack(self, d: Delivery) -> None:
        """Acknowledge ``d``: it is done with, so the heartbeat stops refreshing it and nobody hands it back."""
        await self.queue.ack(d)
        self.held.pop(d.entry_id, None)

    def count_terminal(self, key: VariantKey, state: JobState, reason: str | None = None) -> None:
        """Count a job that reached ``state`` (failures also by reason)."""
        self.metrics.jobs_finished.labels(key.model, key.variant, state.value).inc()
        if state is JobState.FAILED:
            self.metrics.jobs_failed.labels(key.model, key.variant, reason or "internal").inc()
