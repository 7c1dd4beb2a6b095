"""The seam between the API and the workers: two protocols, implemented by the Redis and in-process queues.

``JobQueue`` is what the API needs (submit, look up, cancel, follow events); ``WorkerQueue`` is what a
worker needs (read deliveries, start, report progress, finish, acknowledge, reclaim, dead-letter). Both
implementations give the same guarantees where they make sense: state changes are check-and-set, so a
job finishes exactly once however many times it was delivered.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from pydantic import BaseModel, Field

from service.jobs.model import Job, JobError, JobEvent, JobResult, JobState
from service.registry import VariantKey


class QueueFullError(Exception):
    """The bounded queue (or one variant's share of it) is at capacity; the caller answers 503 + ``Retry-After``."""

    def __init__(self, depth: int, capacity: int, variant: str | None = None) -> None:
        self.depth, self.capacity, self.variant = depth, capacity, variant
        where = f"variant {variant}'s share of the queue" if variant else "the queue"
        super().__init__(f"{where} is full ({depth} of {capacity} jobs waiting)")


class QueueUnavailableError(Exception):
    """The queue backend (Redis) cannot be reached."""


class IdempotencyConflictError(Exception):
    """An Idempotency-Key reused with a different request body."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        super().__init__(f"this Idempotency-Key was used for job {job_id} with a different request body")


@dataclass
class Submission:
    job: Job
    created: bool  # False: an Idempotency-Key replay returned an existing job


@dataclass
class Delivery:
    """One stream entry handed to a worker (``deliveries`` counts how often, crashes included)."""

    job_id: str
    key: VariantKey
    entry_id: str
    deliveries: int = 1


StartStatus = Literal["started", "terminal", "missing", "stale", "canceled", "expired"]


@dataclass
class StartOutcome:
    status: StartStatus
    job: Job | None = None


VariantState = Literal["not_built", "available", "building", "loaded", "failed"]


class BuildProgress(BaseModel):
    """Where a background build of a variant's artifact stands (``phase`` e.g. calibrating, evaluating)."""

    phase: str
    done: int = 0
    total: int | None = None
    eta_s: float | None = Field(None, description="estimated seconds until the build (and its evaluation) ends")
    started_at: float | None = None


class VariantStatus(BaseModel):
    """What a worker knows about one variant: published for ``GET /models`` and readiness."""

    state: VariantState
    reason: str | None = None
    recipe: str = ""
    precision: str = ""
    device: str = ""
    weight_bytes: int | None = None
    peak_memory_bytes: int | None = None
    memory_kind: str | None = Field(None, description="process_rss (CPU) or cuda_max_allocated (GPU)")
    load_seconds: float | None = None
    compile_s: float | None = Field(None, description="torch.compile warm-up at load (None: not compiled)")
    build_seconds: float | None = None
    progress: BuildProgress | None = Field(None, description="while state is building")
    shared_bytes: int | None = Field(None, description="the model's shared parts (text encoders, VAE) as loaded")


class WorkerInfo(BaseModel):
    """A worker's advertisement: which variants it serves and their state on that worker."""

    id: str
    host: str
    pid: int
    device: str = ""
    state: Literal["starting", "ready", "draining"] = "starting"
    started_at: float
    metrics_port: int | None = None
    variants: dict[str, VariantStatus] = Field(default_factory=dict, description="'model:variant' → status")
    running: int = 0

    @property
    def loaded(self) -> list[str]:
        return [k for k, s in self.variants.items() if s.state == "loaded"]


class StatsRecord(BaseModel):
    """Timings of one finished job, kept per variant for latency percentiles, ETA and Retry-After."""

    inference_s: float
    total_s: float
    service_s: float = Field(description="inference time divided over the jobs of its batch")


async def expire_if_late(queue: JobQueue, job: Job, now: float) -> Job:
    """Mark a still-queued job whose deadline has passed as expired (shared by every queue implementation)."""
    if job.state is JobState.QUEUED and job.deadline_at is not None and now > job.deadline_at:
        await queue.finish(
            job.id,
            JobState.EXPIRED,
            error=JobError(reason="expired", message="its deadline passed before a worker could start it"),
        )
        return await queue.get(job.id) or job
    return job


class JobQueue(Protocol):
    """API side."""

    async def ping(self) -> None: ...

    async def submit(
        self,
        job: Job,
        *,
        capacity: int,
        variant_capacity: int | None = None,
        idempotency_key: str | None = None,
        request_hash: str = "",
    ) -> Submission: ...

    async def fail_queued(self, key: VariantKey, error: JobError) -> list[str]:
        """Fail every still-queued job of one variant (nobody serves it); returns their ids."""
        ...

    async def get(self, job_id: str) -> Job | None: ...

    async def cancel(self, job_id: str) -> tuple[Job | None, str]: ...

    async def expire_if_late(self, job: Job, now: float) -> Job: ...

    def events(self, job_id: str, after: str | None = None) -> AsyncIterator[JobEvent]: ...

    def valid_event_id(self, text: str) -> bool:
        """Whether ``events(after=text)`` can resume from this id (a ``Last-Event-ID`` the client sent)."""
        ...

    async def wait(self, job_id: str, timeout: float) -> Job | None: ...

    async def position(self, job: Job) -> int | None: ...

    async def depths(self, keys: list[VariantKey]) -> dict[VariantKey, int]: ...

    async def total_depth(self) -> int: ...

    async def stats(self, key: VariantKey) -> list[StatsRecord]: ...

    async def workers(self) -> list[WorkerInfo]: ...

    async def dead_letters(self, count: int = 100) -> list[dict[str, Any]]: ...

    async def close(self) -> None: ...


class WorkerQueue(Protocol):
    """Worker side."""

    async def prepare(self, keys: list[VariantKey]) -> None: ...

    async def advertise(self, info: WorkerInfo, ttl_s: float) -> None: ...

    async def get(self, job_id: str) -> Job | None: ...

    async def withdraw(self, worker_id: str) -> None: ...

    async def read(self, keys: list[VariantKey], consumer: str, count: int, block_ms: int) -> list[Delivery]: ...

    async def reclaim(self, keys: list[VariantKey], consumer: str, min_idle_s: float, count: int) -> list[Delivery]: ...

    async def refresh(self, deliveries: list[Delivery], consumer: str) -> set[str]: ...

    async def start(self, delivery: Delivery, worker_id: str) -> StartOutcome: ...

    async def progress(self, job_id: str, step: int, total: int) -> None: ...

    async def cancel_requested(self, job_ids: list[str]) -> set[str]: ...

    async def finish(
        self,
        job_id: str,
        state: JobState,
        *,
        result: JobResult | None = None,
        error: JobError | None = None,
        worker_id: str | None = None,
    ) -> bool: ...

    async def ack(self, delivery: Delivery) -> None: ...

    async def release(self, delivery: Delivery, worker_id: str) -> str:
        """Hand a delivery back (outcome as in :mod:`service.jobs.transitions`: requeued, stale, not_owner…)."""
        ...

    async def dead_letter(self, delivery: Delivery, message: str) -> bool: ...

    async def record_stats(self, key: VariantKey, records: list[StatsRecord]) -> None: ...

    async def forget_consumer(self, keys: list[VariantKey], consumer: str) -> None: ...
