"""The async job API: submit, look up, follow (SSE), cancel."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Header, Request
from fastapi.responses import JSONResponse
from sse_starlette.sse import EventSourceResponse, ServerSentEvent

from service.api.deps import JobsDep
from service.api.errors import ApiError
from service.api.routes.common import accepted, principal
from service.api.schemas import GenerateRequest, JobPublic
from service.jobs.model import JobState

router = APIRouter(prefix="/jobs", tags=["jobs"])
EVENT_ID_PATTERN = r"^[0-9]{1,20}(-[0-9]{1,20})?$"  # Redis stream ids (ms-seq) and in-process counters


@router.post(
    "",
    status_code=202,
    response_model=JobPublic,
    summary="Queue a generation job",
    responses={200: {"model": JobPublic, "description": "Idempotency-Key replay: the existing job"}},
)
async def submit_job(
    body: GenerateRequest, request: Request, jobs: JobsDep, idempotency_key: Annotated[str | None, Header()] = None
) -> JSONResponse:
    sub = await jobs.submit(body, idempotency_key=idempotency_key, principal=principal(request))
    return await accepted(jobs, sub.job, created=sub.created)


@router.get("/{job_id}", response_model=JobPublic, summary="A job: state, queue position and ETA, result")
async def get_job(job_id: str, jobs: JobsDep) -> JobPublic:
    return await jobs.public(await jobs.get(job_id))


@router.get(
    "/{job_id}/events",
    summary="Server-sent events: queued, started, progress per step, terminal",
    response_class=EventSourceResponse,
    responses={
        200: {
            "content": {"text/event-stream": {}},
            "description": "events `queued`, `started`, `progress` ({step, total}), "
            "`cancel_requested`, `requeued`, then one of `succeeded`, `failed`, "
            "`canceled`, `expired` carrying the job; supports Last-Event-ID",
        },
        400: {"description": "Last-Event-ID is not an event id of this stream"},
    },
)
async def job_events(
    job_id: str,
    jobs: JobsDep,
    last_event_id: Annotated[
        str | None,
        Header(
            description="resume after this event id (the `id` of an event this stream sent)",
            json_schema_extra={"pattern": EVENT_ID_PATTERN},
        ),
    ] = None,
) -> EventSourceResponse:
    jobs.check_event_id(last_event_id)  # 400 and 404 before the stream starts
    await jobs.get(job_id)

    async def stream() -> AsyncIterator[ServerSentEvent]:
        async for event in jobs.queue.events(job_id, after=last_event_id):
            data = dict(event.data)
            if event.terminal:
                data = (await jobs.public(await jobs.get(job_id))).model_dump(mode="json")
            elif event.type == "queued":
                job = await jobs.get(job_id)
                data = {"state": job.state.value}
                if job.state is JobState.QUEUED:
                    public = await jobs.public(job)
                    data |= {"queue_position": public.queue_position, "eta_s": public.eta_s}
            yield ServerSentEvent(data=json.dumps(data), event=event.type, id=event.id)

    return EventSourceResponse(stream(), ping=15)


@router.delete(
    "/{job_id}",
    response_model=JobPublic,
    summary="Cancel a job",
    responses={
        202: {"model": JobPublic, "description": "running: it stops after the current step"},
        409: {"description": "the job had already finished"},
    },
)
async def cancel_job(job_id: str, jobs: JobsDep) -> JSONResponse:
    job, outcome = await jobs.cancel(job_id)
    public = (await jobs.public(job)).model_dump(mode="json")
    if outcome == "terminal":
        raise ApiError(
            409,
            f"job {job_id} already {job.state.value}; nothing to cancel",
            code="job_finished",
            extra={"job": public},
        )
    return JSONResponse(public, status_code=202 if outcome == "cancel_requested" else 200)
