"""The in-process queue of embedded mode: the same protocols as the Redis queue, held in memory.

It keeps the semantics that make sense inside one process — bounded capacity, check-and-set state changes,
per-job event logs with replay, idempotency keys, result TTL, hand-back on drain — and drops those that
only matter across processes (reclaim after a crash, dead-lettering): if this process dies, so does its
queue. All methods run on the event loop; the worker's pipeline thread never touches this object.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

from service.jobs.constants import STATS_KEEP
from service.jobs.model import Job, JobError, JobEvent, JobResult, JobState, Progress
from service.jobs.queue import (
    Delivery,
    IdempotencyConflictError,
    QueueFullError,
    StartOutcome,
    StatsRecord,
    Submission,
    WorkerInfo,
    expire_if_late,
)
from service.registry import VariantKey


class LocalQueue:
    """Implements both :class:`~service.jobs.queue.JobQueue` and :class:`~service.jobs.queue.WorkerQueue`."""

    def __init__(self, *, result_ttl_s: int, idempotency_ttl_s: int = 86400) -> None:
        self.result_ttl_s = result_ttl_s
        self.idempotency_ttl_s = idempotency_ttl_s
        self._jobs: dict[str, Job] = {}
        self._entry: dict[str, str] = {}  # job id → current entry id
        self._expires: dict[str, float] = {}
        self._queues: dict[VariantKey, deque[tuple[str, str]]] = {}
        self._events: dict[str, list[JobEvent]] = {}
        self._idem: dict[str, tuple[str, str, float]] = {}
        self._workers: dict[str, tuple[WorkerInfo, float]] = {}
        self._stats: dict[VariantKey, deque[StatsRecord]] = {}
        self._ids = itertools.count(1)
        self._changed = asyncio.Condition()

    # ------------------------------------------------------------------ helpers
    def _sweep(self) -> None:
        now = time.time()
        for job_id in [j for j, t in self._expires.items() if t <= now]:
            self._expires.pop(job_id)
            self._jobs.pop(job_id, None)
            self._events.pop(job_id, None)
            self._entry.pop(job_id, None)
        for k in [k for k, (_, _, t) in self._idem.items() if t <= now]:
            self._idem.pop(k)

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    def _event(self, job_id: str, kind: str, data: dict[str, Any] | None = None) -> None:
        self._events.setdefault(job_id, []).append(JobEvent(id=str(next(self._ids)), type=kind, data=data or {}))

    def _depth(self, key: VariantKey) -> int:
        return sum(
            1
            for _, j in self._queues.get(key, ())
            if self._jobs.get(j, None) is not None and self._jobs[j].state is JobState.QUEUED
        )

    def _terminate(
        self,
        job: Job,
        state: JobState,
        *,
        result: JobResult | None = None,
        error: JobError | None = None,
        worker_id: str | None = None,
    ) -> None:
        job.state, job.finished_at = state, time.time()
        job.result, job.error = result or job.result, error or job.error
        job.worker_id = worker_id or job.worker_id
        self._event(job.id, state.value)
        self._expires[job.id] = job.finished_at + self.result_ttl_s

    # ------------------------------------------------------------------ API side
    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        await self._notify()

    async def submit(
        self,
        job: Job,
        *,
        capacity: int,
        variant_capacity: int | None = None,
        idempotency_key: str | None = None,
        request_hash: str = "",
    ) -> Submission:
        self._sweep()
        if idempotency_key and idempotency_key in self._idem:
            job_id, digest, _ = self._idem[idempotency_key]
            if job_id in self._jobs:
                if digest != request_hash:
                    raise IdempotencyConflictError(job_id)
                return Submission(self._jobs[job_id].model_copy(deep=True), created=False)
        depth = await self.total_depth()
        if depth >= capacity:
            raise QueueFullError(depth, capacity)
        key = VariantKey(job.params.model, job.params.variant)
        mine = self._depth(key)
        if variant_capacity is not None and mine >= variant_capacity:
            raise QueueFullError(mine, variant_capacity, str(key))
        entry = str(next(self._ids))
        stored = job.model_copy(deep=True)
        self._jobs[job.id], self._entry[job.id] = stored, entry
        self._queues.setdefault(key, deque()).append((entry, job.id))
        self._event(job.id, "queued")
        if idempotency_key:
            self._idem[idempotency_key] = (job.id, request_hash, time.time() + self.idempotency_ttl_s)
        await self._notify()
        return Submission(stored.model_copy(deep=True), created=True)

    async def fail_queued(self, key: VariantKey, error: JobError) -> list[str]:
        failed = [
            j.id
            for j in self._jobs.values()
            if j.state is JobState.QUEUED and VariantKey(j.params.model, j.params.variant) == key
        ]  # read-but-not-started jobs too (they left the deque but still wait), as in Redis
        for job_id in failed:
            self._terminate(self._jobs[job_id], JobState.FAILED, error=error)
        if failed:
            await self._notify()
        return failed

    async def get(self, job_id: str) -> Job | None:
        self._sweep()
        job = self._jobs.get(job_id)
        return job.model_copy(deep=True) if job else None

    async def cancel(self, job_id: str) -> tuple[Job | None, str]:
        job = self._jobs.get(job_id)
        if job is None:
            return None, "missing"
        if job.state is JobState.QUEUED:
            self._terminate(job, JobState.CANCELED, error=JobError(reason="canceled", message="canceled while queued"))
            outcome = "canceled"
        elif job.state is JobState.RUNNING:
            if not job.cancel_requested:
                job.cancel_requested = True
                self._event(job_id, "cancel_requested")
            outcome = "cancel_requested"
        else:
            outcome = "terminal"
        await self._notify()
        return job.model_copy(deep=True), outcome

    async def expire_if_late(self, job: Job, now: float) -> Job:
        return await expire_if_late(self, job, now)

    async def events(self, job_id: str, after: str | None = None) -> AsyncIterator[JobEvent]:
        seen = int(after) if after and self.valid_event_id(after) else 0
        while True:
            log = self._events.get(job_id)
            if log is None:
                return
            fresh = [e for e in log if int(e.id) > seen]
            for event in fresh:
                seen = int(event.id)
                yield event
                if event.terminal:
                    return
            if not fresh:
                async with self._changed:
                    await _wait(self._changed, 5.0)

    def valid_event_id(self, text: str) -> bool:
        """Event ids here are decimal counters."""
        return text.isascii() and text.isdigit() and len(text) <= 20

    async def wait(self, job_id: str, timeout: float) -> Job | None:
        deadline = time.monotonic() + timeout
        while True:
            job = await self.get(job_id)
            remaining = deadline - time.monotonic()
            if job is None or job.state.terminal or remaining <= 0:
                return job
            async with self._changed:
                await _wait(self._changed, remaining)

    async def position(self, job: Job) -> int | None:
        if job.state is not JobState.QUEUED:
            return None
        key = VariantKey(job.params.model, job.params.variant)
        waiting = [
            j
            for _, j in self._queues.get(key, ())
            if self._jobs.get(j) is not None and self._jobs[j].state is JobState.QUEUED
        ]
        return waiting.index(job.id) + 1 if job.id in waiting else 0

    async def depths(self, keys: list[VariantKey]) -> dict[VariantKey, int]:
        return {k: self._depth(k) for k in keys}

    async def total_depth(self) -> int:
        return sum(1 for j in self._jobs.values() if j.state is JobState.QUEUED)

    async def stats(self, key: VariantKey) -> list[StatsRecord]:
        return list(self._stats.get(key, ()))

    async def workers(self) -> list[WorkerInfo]:
        now = time.time()
        return [info.model_copy(deep=True) for info, until in self._workers.values() if until > now]

    async def dead_letters(self, count: int = 100) -> list[dict[str, Any]]:
        return []

    # ------------------------------------------------------------------ worker side
    async def prepare(self, keys: list[VariantKey]) -> None:
        for key in keys:
            self._queues.setdefault(key, deque())

    async def advertise(self, info: WorkerInfo, ttl_s: float) -> None:
        self._workers[info.id] = (info.model_copy(deep=True), time.time() + ttl_s)

    async def withdraw(self, worker_id: str) -> None:
        self._workers.pop(worker_id, None)

    def _pop(self, keys: list[VariantKey], count: int) -> list[Delivery]:
        for key in keys:
            q = self._queues.get(key)
            out: list[Delivery] = []
            while q and len(out) < count:
                entry, job_id = q.popleft()
                job = self._jobs.get(job_id)
                if job is not None and job.state is JobState.QUEUED and self._entry.get(job_id) == entry:
                    out.append(Delivery(job_id, key, entry))
            if out:
                return out
        return []

    async def read(self, keys: list[VariantKey], consumer: str, count: int, block_ms: int) -> list[Delivery]:
        found = self._pop(keys, count)
        if found or block_ms <= 0:
            return found
        deadline = time.monotonic() + block_ms / 1000
        while not found and (remaining := deadline - time.monotonic()) > 0:
            async with self._changed:
                await _wait(self._changed, remaining)
            found = self._pop(keys, count)
        return found

    async def reclaim(self, keys: list[VariantKey], consumer: str, min_idle_s: float, count: int) -> list[Delivery]:
        return []  # one process: nothing can be orphaned by another worker's death

    async def refresh(self, deliveries: list[Delivery], consumer: str) -> set[str]:
        return set()

    async def start(self, delivery: Delivery, worker_id: str) -> StartOutcome:
        job = self._jobs.get(delivery.job_id)
        if job is None:
            return StartOutcome("missing")
        if job.state.terminal:
            return StartOutcome("terminal", job.model_copy(deep=True))
        if self._entry.get(job.id) != delivery.entry_id:
            return StartOutcome("stale", job.model_copy(deep=True))
        now = time.time()
        if job.cancel_requested:
            self._terminate(
                job, JobState.CANCELED, error=JobError(reason="canceled", message="canceled before it started")
            )
            status = "canceled"
        elif job.deadline_at is not None and now > job.deadline_at:
            self._terminate(
                job,
                JobState.EXPIRED,
                error=JobError(reason="expired", message="its deadline passed before a worker could start it"),
            )
            status = "expired"
        else:
            job.state, job.worker_id, job.started_at, job.progress = JobState.RUNNING, worker_id, now, None
            job.attempts += 1
            self._event(job.id, "started", {"worker_id": worker_id, "attempt": job.attempts})
            status = "started"
        await self._notify()
        return StartOutcome(status, job.model_copy(deep=True))  # type: ignore[arg-type]

    async def progress(self, job_id: str, step: int, total: int) -> None:
        job = self._jobs.get(job_id)
        if job is None or job.state.terminal:
            return
        job.progress = Progress(step=step, total=total)
        self._event(job_id, "progress", {"step": step, "total": total})
        await self._notify()

    async def cancel_requested(self, job_ids: list[str]) -> set[str]:
        return {j for j in job_ids if (job := self._jobs.get(j)) is not None and job.cancel_requested}

    async def finish(
        self,
        job_id: str,
        state: JobState,
        *,
        result: JobResult | None = None,
        error: JobError | None = None,
        worker_id: str | None = None,
    ) -> bool:
        job = self._jobs.get(job_id)
        if job is None or job.state.terminal:
            return False
        self._terminate(job, state, result=result, error=error, worker_id=worker_id)
        await self._notify()
        return True

    async def ack(self, delivery: Delivery) -> None:
        return None

    async def release(self, delivery: Delivery, worker_id: str) -> str:
        """Hand a delivery back: the job waits again at the tail of its variant's queue (as in Redis)."""
        job = self._jobs.get(delivery.job_id)
        if job is None:
            return "missing"
        if self._entry.get(job.id) != delivery.entry_id:
            return "stale"
        if job.state is JobState.RUNNING and job.worker_id != worker_id:
            return "not_owner"
        if job.state.terminal:
            return "terminal"
        job.state, job.progress = JobState.QUEUED, None
        entry = str(next(self._ids))
        self._entry[job.id] = entry
        self._queues.setdefault(delivery.key, deque()).append((entry, job.id))  # REQUEUE_END: the tail
        self._event(job.id, "requeued")
        await self._notify()
        return "requeued"

    async def dead_letter(self, delivery: Delivery, message: str) -> bool:
        return await self.finish(
            delivery.job_id, JobState.FAILED, error=JobError(reason="worker_lost", message=message)
        )

    async def record_stats(self, key: VariantKey, records: list[StatsRecord]) -> None:
        self._stats.setdefault(key, deque(maxlen=STATS_KEEP)).extendleft(records)

    async def forget_consumer(self, keys: list[VariantKey], consumer: str) -> None:
        return None


async def _wait(cond: asyncio.Condition, timeout: float) -> None:
    """Wait on a held condition for at most ``timeout`` seconds."""
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(cond.wait(), timeout=max(0.0, timeout))
