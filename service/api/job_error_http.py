"""The HTTP answer to each job-request error (the job service itself knows no status codes)."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from service.api.errors import error_response, validation_error_response, validation_problem
from service.api.job_errors import BadEventId, InvalidField, JobNotFound, QueueBusy
from service.jobs.queue import IdempotencyConflictError, QueueUnavailableError
from service.registry import UnknownModelError


async def _invalid_field(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, InvalidField)
    return await validation_error_response(request, validation_problem(exc.field, exc.message, exc.kind))


async def _unknown_name(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, UnknownModelError)
    return error_response(404, str(exc), code=f"unknown_{exc.what}", param=exc.what, valid=exc.valid)


async def _not_found(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, JobNotFound)
    return error_response(404, str(exc), code="unknown_job", param="job_id")


async def _busy(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, QueueBusy)
    return error_response(503, str(exc), code="queue_full", headers={"Retry-After": str(exc.retry_after_s)})


async def _unavailable(request: Request, exc: Exception) -> JSONResponse:
    return error_response(
        503, f"the job queue is unavailable: {exc}", code="queue_unavailable", headers={"Retry-After": "5"}
    )


async def _idempotency(request: Request, exc: Exception) -> JSONResponse:
    return error_response(409, str(exc), code="idempotency_key_reused", param="Idempotency-Key")


async def _bad_event_id(request: Request, exc: Exception) -> JSONResponse:
    return error_response(400, str(exc), code="invalid_last_event_id", param="Last-Event-ID")


def install_job_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(InvalidField, _invalid_field)
    app.add_exception_handler(UnknownModelError, _unknown_name)
    app.add_exception_handler(JobNotFound, _not_found)
    app.add_exception_handler(QueueBusy, _busy)
    app.add_exception_handler(QueueUnavailableError, _unavailable)
    app.add_exception_handler(IdempotencyConflictError, _idempotency)
    app.add_exception_handler(BadEventId, _bad_event_id)
