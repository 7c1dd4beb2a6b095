"""``POST /generate``: synchronous by default; ``Prefer: respond-async`` → 202; ``Accept: image/png`` → raw bytes."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Header, Request
from fastapi.responses import JSONResponse, Response

from service.api.deps import JobsDep, SettingsDep
from service.api.errors import validation_problem
from service.api.routes.common import (
    accepted,
    finished_or_accepted,
    principal,
    raw_image_format,
    raw_image_response,
    wants_async,
)
from service.api.schemas import GenerateRequest, GenerateResponse, ImagePublic, JobPublic

router = APIRouter(tags=["generate"])


@router.post(
    "/generate",
    response_model=GenerateResponse,
    summary="Generate images (waits for the result)",
    responses={
        202: {
            "model": JobPublic,
            "description": "queued (Prefer: respond-async, or the wait ran out); follow the Location",
        },
        200: {
            "content": {"image/png": {}, "image/jpeg": {}, "image/webp": {}},
            "description": "JSON, or the raw image with Accept: image/* and n=1",
        },
    },
)
async def generate(
    body: GenerateRequest,
    request: Request,
    jobs: JobsDep,
    settings: SettingsDep,
    prefer: Annotated[str | None, Header()] = None,
    accept: Annotated[str | None, Header()] = None,
    idempotency_key: Annotated[str | None, Header()] = None,
) -> Response:
    start = time.perf_counter()
    raw = raw_image_format(accept)
    if raw is not None and body.n != 1:
        raise validation_problem("n", f"must be 1 when asking for a raw image (Accept: {accept})")
    sub = await jobs.submit(body, idempotency_key=idempotency_key, principal=principal(request), output_format=raw)
    if wants_async(prefer):
        return await accepted(jobs, sub.job, created=sub.created)
    job = await jobs.wait(sub.job.id, settings.limits.sync_timeout_s)
    done = await finished_or_accepted(jobs, job)
    if isinstance(done, JSONResponse):
        return done
    jobs.metrics.request_duration.labels(job.params.model, job.params.variant, "sync").observe(
        time.perf_counter() - start
    )
    if raw is not None:
        return raw_image_response(done)
    assert done.result is not None
    p = done.params
    answer = GenerateResponse(
        id=done.id,
        model=p.model,
        variant=p.variant,
        precision=done.result.precision,
        seeds=p.seeds,
        width=p.width,
        height=p.height,
        num_inference_steps=p.num_inference_steps,
        guidance_scale=p.guidance_scale,
        loras=p.loras,
        images=[ImagePublic(**i.model_dump()) for i in done.result.images],
        timings=done.result.timings,
        worker_id=done.result.worker_id,
        batch_size=done.result.batch_size,
    )
    return JSONResponse(answer.model_dump(mode="json"), headers={"X-Job-Id": done.id})
