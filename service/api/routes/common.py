"""Helpers shared by the generation routes (sync wait, 202 answers, content negotiation)."""

from __future__ import annotations

import base64

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from service.api.errors import ApiError
from service.api.job_service import JobService
from service.jobs.model import MEDIA_TYPES, Job, JobState
from service.jobs.unserved import UNSERVED_REASON

IMAGE_TYPES = {v: k for k, v in MEDIA_TYPES.items()}


def principal(request: Request) -> str:
    """Who is asking (hashed API key), to scope idempotency keys; '' without auth."""
    return str(request.scope.get("state", {}).get("principal", ""))


def wants_async(prefer: str | None) -> bool:
    return prefer is not None and "respond-async" in prefer.lower()


def raw_image_format(accept: str | None) -> str | None:
    """The image format a client asked for with ``Accept: image/png`` (etc.), if any."""
    for part in (accept or "").split(","):
        media = part.split(";")[0].strip().lower()
        if media in IMAGE_TYPES:
            return IMAGE_TYPES[media]
    return None


async def accepted(jobs: JobService, job: Job, *, created: bool = True) -> JSONResponse:
    """202 with the job and where to follow it."""
    public = await jobs.public(job)
    headers = {"Location": public.links.self}
    if not created:
        headers["Idempotent-Replayed"] = "true"
    return JSONResponse(public.model_dump(mode="json"), status_code=202 if created else 200, headers=headers)


async def finished_or_accepted(jobs: JobService, job: Job) -> Job | JSONResponse:
    """A finished, successful job; a 202 when the sync wait ran out; or the failure as an error."""
    if not job.state.terminal:
        return await accepted(jobs, job)
    if job.state is not JobState.SUCCEEDED or job.result is None:
        raise failure_error(job)
    return job


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


def raw_image_response(job: Job) -> Response:
    assert job.result is not None
    image = job.result.images[0]
    return Response(
        content=base64.b64decode(image.b64_json),
        media_type=MEDIA_TYPES[image.format],
        headers={
            "X-Job-Id": job.id,
            "X-Seed": str(image.seed),
            "X-Model": job.params.model,
            "X-Variant": job.params.variant,
            "X-Inference-Seconds": str(job.result.timings.inference_s),
            "X-Worker-Id": job.result.worker_id,
        },
    )
