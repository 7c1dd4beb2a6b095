"""Turning requests into jobs: checks against the registry and limits, submission, waiting, public views.

Knows the queue protocol and the registry, not torch and not HTTP: problems come out as the errors of
:mod:`service.api.job_errors` (or the queue's and registry's own), and :mod:`service.api.job_error_http`
answers them.
"""

from __future__ import annotations

import hashlib
import math
import secrets
import statistics
import time
from datetime import datetime, timezone

from service.api.build_wait import build_progress, refuse_if_unbuilt
from service.api.job_errors import BadEventId, InvalidField, JobNotFound, QueueBusy
from service.api.schemas import GenerateRequest, JobLinks, JobPublic, LoraRequest
from service.jobs.capacity import variant_capacity
from service.jobs.model import AdapterUse, GenerationParams, Job, JobError, JobState
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
from service.registry import ModelSpec, Registry, VariantKey
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
        model = self.registry.model(req.model)  # UnknownModelError names the valid choices
        variant = model.variant(req.variant)
        if len(req.prompt) > limits.max_prompt_chars:
            raise InvalidField(
                "prompt",
                f"must be at most {limits.max_prompt_chars} characters (got {len(req.prompt)})",
                "string_too_long",
            )
        if req.negative_prompt is not None and len(req.negative_prompt) > limits.max_prompt_chars:
            raise InvalidField(
                "negative_prompt",
                f"must be at most {limits.max_prompt_chars} characters (got {len(req.negative_prompt)})",
                "string_too_long",
            )
        rule = model.size_rule
        width, height = req.width or rule.default, req.height or rule.default
        for name, value in (("width", width), ("height", height)):
            problem = rule.problem(value)
            if problem:
                raise InvalidField(name, f"{problem} for model {model.name!r}")
        steps = req.num_inference_steps or model.defaults.num_inference_steps
        if steps > limits.max_inference_steps:
            raise InvalidField(
                "num_inference_steps", f"must be between 1 and {limits.max_inference_steps} (got {steps})"
            )
        guidance = model.defaults.guidance_scale if req.guidance_scale is None else req.guidance_scale
        if guidance > limits.max_guidance_scale:
            raise InvalidField("guidance_scale", f"must be between 0 and {limits.max_guidance_scale} (got {guidance})")
        if req.n > limits.max_images:
            raise InvalidField("n", f"must be between 1 and {limits.max_images} (got {req.n})")
        if req.deadline_s is not None and req.deadline_s > limits.max_deadline_s:
            raise InvalidField("deadline_s", f"must be at most {limits.max_deadline_s} seconds")
        if req.debug is not None and not self.settings.debug_hooks:
            raise InvalidField("debug", "debug hooks are disabled on this server")
        loras = self._resolve_loras(req.loras, model)
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
            loras=loras,
            debug=req.debug,
        )

    def _resolve_loras(self, wanted: list[LoraRequest], model: ModelSpec) -> list[AdapterUse]:
        """Each asked-for adapter at its scale (the registry's default when none is given), in request order.

        Too many or a repeated name: 422; a name the model does not list: 404 naming the ones it does."""
        limits = self.settings.limits
        if len(wanted) > limits.max_loras_per_request:
            raise InvalidField(
                "loras", f"must hold at most {limits.max_loras_per_request} adapters (got {len(wanted)})", "too_long"
            )
        names = [w.name for w in wanted]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise InvalidField("loras", f"names each adapter at most once (repeated: {', '.join(repeated)})")
        out: list[AdapterUse] = []
        for i, w in enumerate(wanted):
            spec = model.adapter(w.name)  # UnknownModelError (404) lists the model's adapters
            scale = spec.scale if w.scale is None else w.scale
            if abs(scale) > limits.max_lora_scale:
                raise InvalidField(
                    f"loras.{i}.scale",
                    f"must be between -{limits.max_lora_scale:g} and {limits.max_lora_scale:g} (got {scale:g})",
                )
            out.append(AdapterUse(name=spec.name, scale=float(scale)))
        return out

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
                raise InvalidField("Idempotency-Key", "must be 1 to 255 characters")
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
            raise QueueBusy(f"{e}; retry in about {retry} s", retry) from None
        except IdempotencyConflictError:
            self.metrics.rejected.labels("idempotency_conflict").inc()
            raise
        except QueueUnavailableError:
            self.metrics.rejected.labels("queue_unavailable").inc()
            raise
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
        job = await self.queue.get(job_id)
        if job is None:
            raise JobNotFound(
                job_id,
                f"no job {job_id!r} (unknown, or its result expired after {self.settings.queue.result_ttl_s} s)",
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

    def check_event_id(self, last_event_id: str | None) -> None:
        """Refuse a ``Last-Event-ID`` the queue could not resume from, before any event is streamed."""
        if last_event_id is not None and not self.queue.valid_event_id(last_event_id):
            raise BadEventId(last_event_id)

    async def wait(self, job_id: str, timeout: float) -> Job:
        job = await self.queue.wait(job_id, timeout)
        if job is None:
            raise JobNotFound(job_id, f"job {job_id!r} disappeared while waiting")
        return job

    async def cancel(self, job_id: str) -> tuple[Job, str]:
        job, outcome = await self.queue.cancel(job_id)
        if job is None:
            raise JobNotFound(job_id, f"no job {job_id!r}")
        if outcome == "canceled":  # a running job is counted by its worker when it stops
            self.metrics.jobs_finished.labels(job.params.model, job.params.variant, "canceled").inc()
        return job, outcome
