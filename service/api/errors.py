"""One error envelope for every error the API returns.

``{"error": {"message", "type", "param", "code"}}`` — the OpenAI shape, which many clients already parse.
422 responses also keep FastAPI's ``detail`` list (``loc``, ``msg``, ``type`` per problem), and ``message`` /
``param`` name the first offending field and the reason.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.metrics import get_metrics

logger = logging.getLogger(__name__)

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    406: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
    504: "timeout_error",
}


class ApiError(Exception):
    """An error the API answers with, in the envelope; raised from routes and services."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.type = type or _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
        self.headers = headers
        self.extra = extra or {}


def envelope(
    status: int,
    message: str,
    *,
    code: str | None = None,
    param: str | None = None,
    type: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    err = {"message": message, "type": type or _TYPES.get(status, "server_error"), "param": param, "code": code}
    return {"error": {**err, **extra}}


def error_response(status: int, message: str, *, headers: dict[str, str] | None = None, **kw: Any) -> JSONResponse:
    return JSONResponse(envelope(status, message, **kw), status_code=status, headers=headers)


def field_name(loc: Sequence[Any]) -> str:
    """``("body", "width")`` → ``"width"``; header and query locations keep their last part too."""
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or "body"


def validation_problem(field: str, message: str, kind: str = "value_error") -> RequestValidationError:
    """A 422 for one field, raised by checks that need settings or the registry (same shape as pydantic's)."""
    return RequestValidationError([{"loc": ("body", *field.split(".")), "msg": message, "type": kind}])


async def _api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return error_response(
        exc.status, exc.message, headers=exc.headers, code=exc.code, param=exc.param, type=exc.type, **exc.extra
    )


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    if exc.status_code == 404 and message == "Not Found":
        message = f"no route {request.method} {request.url.path}; see /docs"
    return error_response(
        exc.status_code,
        message,
        headers=getattr(exc, "headers", None),
        code={404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}.get(exc.status_code),
    )


async def validation_error_response(request: Request, exc: Exception) -> JSONResponse:
    """The 422 envelope (also used for the job service's own field checks)."""
    assert isinstance(exc, RequestValidationError)
    detail = []
    for e in exc.errors():
        item = {"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": e.get("type", "value_error")}
        detail.append(item)
    first = detail[0] if detail else {"loc": [], "msg": "invalid request"}
    param = field_name(first["loc"])
    get_metrics().rejected.labels("invalid_request").inc()
    body = envelope(422, f"{param}: {first['msg']}", code="invalid_value", param=param)
    body["detail"] = detail
    return JSONResponse(body, status_code=422)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(500, "internal server error", code="internal")


def install_error_handlers(app: FastAPI) -> None:
    from service.api.job_error_http import install_job_error_handlers

    install_job_error_handlers(app)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, validation_error_response)
    app.add_exception_handler(Exception, _unexpected)
