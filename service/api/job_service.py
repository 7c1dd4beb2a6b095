"""Turning requests into jobs: checks against the registry and limits, submission, waiting, public views.

Knows the queue protocol and the registry, not torch and not HTTP routing. Errors come out as
:class:`~service.api.errors.ApiError` (404, 409, 503 + Retry-After) or a 422 validation problem.
"""

from __future__ import annotations

import hashlib
import math
import secrets
import statistics
import time
from datetime import datetime, timezone

from service.api.build_wait import build_progress, refuse_if_unbuilt
from service.api.errors import ApiError, validation_problem
from service.api.schemas import GenerateRequest, JobLinks, JobPublic
from service.jobs.capacity import variant_capacity
from service.jobs.model import GenerationParams, Job, JobError, JobState
from service.jobs.queue import (
    IdempotencyConflictError,
    JobQueue,
    QueueFullError,
    QueueUnavailableError,
    StatsRecord,
    Submission,
)
from service.jobs.unserved import UNSERVED_REASON, UnservedWatch
from service.metrics import Metrics
from service.registry import Registry, UnknownModelError, VariantKey
from service.settings import Settings

MAX_SEED = 2**63 - 1


def _ts(value: float | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(value, tz=timezone.utc)


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


class JobService:
    def __init__(self, queue: JobQueue, registry: Registry, settings: Settings, metrics: Metrics) -> None:
        self.queue, self.registry, self.settings, self.metrics = queue, registry, settings, metrics
        self.unserved = UnservedWatch(settings.queue.unserved_timeout_s)
        q = settings.queue
        self.variant_capacity = variant_capacity(q.max_depth, q.max_depth_per_variant, len(registry.variant_keys()))

    # ------------------------------------------------------------------ validation
    def resolve(self, req: GenerateRequest, *, output_format: str | None = None) -> GenerationParams:
        """Fill defaults, draw seeds and check everything that depends on settings or the model."""
        limits = self.settings.limits
        try:
            model = self.registry.model(req.model)
            variant = model.variant(req.variant)
        except UnknownModelError as e:
            raise ApiError(404, str(e), code=f"unknown_{e.what}", param=e.what, extra={"valid": e.valid}) from None
        if len(req.prompt) > limits.max_prompt_chars:
            raise validation_problem(
                "prompt",
                f"must be at most {limits.max_prompt_chars} characters (got {len(req.prompt)})",
                "string_too_long",
            )
        if req.negative_prompt is not None and len(req.negative_prompt) > limits.max_prompt_chars:
            raise validation_problem(
                "negative_prompt",
                f"must be at most {limits.max_prompt_chars} characters (got {len(req.negative_prompt)})",
                "string_too_long",
            )
        rule = model.size_rule
        width, height = req.width or rule.default, req.height or rule.default
        for name, value in (("width", width), ("height", height)):
            problem = rule.problem(value)
            if problem:
                raise validation_problem(name, f"{problem} for model {model.name!r}")
        steps = req.num_inference_steps or model.defaults.num_inference_steps
        if steps > limits.max_inference_steps:
            raise validation_problem(
                "num_inference_steps", f"must be between 1 and {limits.max_inference_steps} (got {steps})"
            )
        guidance = model.defaults.guidance_scale if req.guidance_scale is None else req.guidance_scale
        if guidance > limits.max_guidance_scale:
            raise validation_problem(
                "guidance_scale", f"must be between 0 and {limits.max_guidance_scale} (got {guidance})"
            )
        if req.n > limits.max_images:
            raise validation_problem("n", f"must be between 1 and {limits.max_images} (got {req.n})")
        if req.deadline_s is not None and req.deadline_s > limits.max_deadline_s:
            raise validation_problem("deadline_s", f"must be at most {limits.max_deadline_s} seconds")
        if req.debug is not None and not self.settings.debug_hooks:
            raise validation_problem("debug", "debug hooks are disabled on this server")
        base = secrets.randbelow(2**31) if req.seed is None else req.seed
        return GenerationParams(
            prompt=req.prompt,
            negative_prompt=req.negative_prompt,
            model=model.name,
            variant=variant.name,
            width=width,
            height=height,
            num_inference_steps=steps,
            guidance_scale=guidance,
            seeds=[(base + i) % (MAX_SEED + 1) for i in range(req.n)],
            output_format=output_format or req.output_format,  # type: ignore[arg-type]
            debug=req.debug,
        )

    # ------------------------------------------------------------------ submission
    async def submit(
        self,
        req: GenerateRequest,
        *,
        idempotency_key: str | None = None,
        principal: str = "",
        output_format: str | None = None,
    ) -> Submission:
        params = self.resolve(req, output_format=output_format)
        now = time.time()
        deadline_s = req.deadline_s or self.settings.queue.default_deadline_s
        job = Job(
            id=Job.new_id(),
            state=JobState.QUEUED,
            params=params,
            created_at=now,
            deadline_at=None if deadline_s is None else now + deadline_s,
        )
        digest = None
        if idempotency_key is not None:
            if not 1 <= len(idempotency_key) <= 255:
                raise validation_problem("Idempotency-Key", "must be 1 to 255 characters")
            digest = hashlib.sha256(f"{principal}\0{idempotency_key}".encode()).hexdigest()
        request_hash = hashlib.sha256(req.model_dump_json().encode()).hexdigest()
        key = VariantKey(params.model, params.variant)
        await refuse_if_unbuilt(self.queue, self.registry, self.settings, key)
        try:
            sub = await self.queue.submit(
                job,
                capacity=self.settings.queue.max_depth,
                variant_capacity=self.variant_capacity,
                idempotency_key=digest,
                request_hash=request_hash,
            )
        except QueueFullError as e:
            self.metrics.rejected.labels("queue_full").inc()
            retry = await self.retry_after(key, e.depth)
            raise ApiError(
                503, f"{e}; retry in about {retry} s", code="queue_full", headers={"Retry-After": str(retry)}
            ) from None
        except IdempotencyConflictError as e:
            self.metrics.rejected.labels("idempotency_conflict").inc()
            raise ApiError(409, str(e), code="idempotency_key_reused", param="Idempotency-Key") from None
        except QueueUnavailableError as e:
            self.metrics.rejected.labels("queue_unavailable").inc()
            raise ApiError(
                503, f"the job queue is unavailable: {e}", code="queue_unavailable", headers={"Retry-After": "5"}
            ) from None
        if sub.created:
            self.metrics.jobs_submitted.labels(key.model, key.variant).inc()
            if await self._fail_if_unserved(key, [sub.job.id]):
                sub = Submission(await self.queue.get(sub.job.id) or sub.job, created=True)
        return sub

    # ------------------------------------------------------------------ variants nobody serves
    async def _observe_workers(self, now: float) -> None:
        workers = await self.queue.workers()
        served = {k for w in workers if w.state != "draining" for k in w.variants}
        self.unserved.observe(self.registry.variant_keys(), served, now)

    async def _fail_if_unserved(self, key: VariantKey, job_ids: list[str] | None = None) -> list[str]:
        """Fail the variant's queued jobs (or just ``job_ids``) when nobody has served it for the timeout."""
        now = time.time()
        try:
            await self._observe_workers(now)
        except QueueUnavailableError:
            return []
        if self.unserved.overdue(key, now) is None:
            return []
        error = JobError(reason=UNSERVED_REASON, message=self.unserved.message(key, now))
        if job_ids is None:
            failed = await self.queue.fail_queued(key, error)
        else:
            failed = [j for j in job_ids if await self.queue.finish(j, JobState.FAILED, error=error)]
        for _ in failed:
            self.metrics.jobs_finished.labels(key.model, key.variant, "failed").inc()
            self.metrics.jobs_failed.labels(key.model, key.variant, UNSERVED_REASON).inc()
        return failed

    async def fail_unserved(self) -> list[str]:
        """One sweep: fail the queued jobs of every variant that no live worker has served for the timeout."""
        failed: list[str] = []
        depths = await self.queue.depths(self.registry.variant_keys())
        for key, depth in depths.items():
            if depth > 0:
                failed += await self._fail_if_unserved(key)
        return failed

    # ------------------------------------------------------------------ timing estimates
    async def _service_s(self, key: VariantKey) -> tuple[float, int]:
        """(recent seconds of worker time per job, live workers serving the variant)."""
        records: list[StatsRecord] = await self.queue.stats(key)
        recent = [r.service_s for r in records[:32]]
        service = statistics.fmean(recent) if recent else self.settings.queue.default_service_s
        workers = [w for w in await self.queue.workers() if str(key) in w.variants and w.state != "draining"]
        return service, max(1, len(workers))

    async def retry_after(self, key: VariantKey, depth: int) -> int:
        """Seconds until the queue has room: depth × recent service time ÷ workers (at least 1)."""
        try:
            service, workers = await self._service_s(key)
        except QueueUnavailableError:
            return 5
        return max(1, math.ceil(depth * service / workers))

    # ------------------------------------------------------------------ lookups
    async def get(self, job_id: str) -> Job:
        try:
            job = await self.queue.get(job_id)
        except QueueUnavailableError as e:
            raise ApiError(
                503, f"the job queue is unavailable: {e}", code="queue_unavailable", headers={"Retry-After": "5"}
            ) from None
        if job is None:
            raise ApiError(
                404,
                f"no job {job_id!r} (unknown, or its result expired after {self.settings.queue.result_ttl_s} s)",
                code="unknown_job",
                param="job_id",
            )
        checked = await self.queue.expire_if_late(job, time.time())
        if checked.state is JobState.EXPIRED and job.state is not JobState.EXPIRED:
            self.metrics.jobs_finished.labels(job.params.model, job.params.variant, "expired").inc()
        return checked

    async def public(self, job: Job) -> JobPublic:
        position = eta = build = None
        if job.state is JobState.QUEUED:
            position = await self.queue.position(job)
            key = VariantKey(job.params.model, job.params.variant)
            if position is not None:
                service, workers = await self._service_s(key)
                eta = round(position * service / workers, 2)
            build = await build_progress(self.queue, self.registry, self.settings, key)
            if build is not None:  # it waits for its variant's build first
                eta = None if build.eta_s is None else round(build.eta_s + (eta or 0.0), 2)
        return JobPublic(
            id=job.id,
            state=job.state,
            model=job.params.model,
            variant=job.params.variant,
            created_at=_ts(job.created_at),
            started_at=_ts(job.started_at),
            finished_at=_ts(job.finished_at),
            deadline_at=_ts(job.deadline_at),
            queue_position=position,
            eta_s=eta,
            waiting_for_build=build,
            progress=job.progress,
            attempts=job.attempts,
            worker_id=job.worker_id,
            cancel_requested=job.cancel_requested,
            params=job.params,
            result=job.result,
            error=job.error,
            links=JobLinks(self=f"/jobs/{job.id}", events=f"/jobs/{job.id}/events"),
        )

    async def wait(self, job_id: str, timeout: float) -> Job:
        try:
            job = await self.queue.wait(job_id, timeout)
        except QueueUnavailableError as e:
            raise ApiError(
                503, f"the job queue is unavailable: {e}", code="queue_unavailable", headers={"Retry-After": "5"}
            ) from None
        if job is None:
            raise ApiError(404, f"job {job_id!r} disappeared while waiting", code="unknown_job")
        return job

    async def cancel(self, job_id: str) -> tuple[Job, str]:
        try:
            job, outcome = await self.queue.cancel(job_id)
        except QueueUnavailableError as e:
            raise ApiError(
                503, f"the job queue is unavailable: {e}", code="queue_unavailable", headers={"Retry-After": "5"}
            ) from None
        if job is None:
            raise ApiError(404, f"no job {job_id!r}", code="unknown_job", param="job_id")
        if outcome == "canceled":  # a running job is counted by its worker when it stops
            self.metrics.jobs_finished.labels(job.params.model, job.params.variant, "canceled").inc()
        return job, outcome


def failure_error(job: Job) -> ApiError:
    """The error a synchronous request answers with when its job did not succeed."""
    reason = job.error.reason if job.error else job.state.value
    message = f"job {job.id} {job.state.value}: {job.error.message if job.error else reason}"
    status = {JobState.CANCELED: 409, JobState.EXPIRED: 504}.get(job.state)
    if status is None:
        status = {"model_unavailable": 503, UNSERVED_REASON: 503, "invalid": 422}.get(reason, 500)
    return ApiError(
        status, message, code=reason, type="generation_error" if status >= 500 else None, extra={"job_id": job.id}
    )
