"""Pure-ASGI middleware: request metrics, optional bearer-token auth, and the request body size limit.

Pure ASGI (not ``BaseHTTPMiddleware``) so SSE responses stream through untouched.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from typing import Any

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.errors import envelope
from service.metrics import Metrics

PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/"})
# The playground's static files carry no data; the page asks for the key and sends it with every API call.
PUBLIC_PREFIXES = ("/web/",)


async def _send_json(send: Send, status: int, body: dict[str, Any], headers: list[tuple[bytes, bytes]]) -> None:
    import json

    data = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()), *headers],
        }
    )
    await send({"type": "http.response.body", "body": data})


class MetricsMiddleware:
    """Counts requests and times them by route template (never by raw path: bounded label values)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = [500]
        start = time.perf_counter()

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            if route != "/metrics":
                method = scope.get("method", "GET")
                self.metrics.http_requests.labels(route, method, str(status[0])).inc()
                self.metrics.http_duration.labels(route, method).observe(time.perf_counter() - start)


class AuthMiddleware:
    """``Authorization: Bearer <key>`` on every route but the health probes, when keys are configured."""

    def __init__(self, app: ASGIApp, keys: list[str], metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics
        self._digests = [hashlib.sha256(k.encode()).digest() for k in keys]

    def _valid(self, token: str) -> bool:
        digest = hashlib.sha256(token.encode()).digest()
        return any(hmac.compare_digest(digest, d) for d in self._digests)  # constant time per key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in PUBLIC_PATHS or scope["path"].startswith(PUBLIC_PREFIXES):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
        if scheme.lower() != "bearer" or not token or not self._valid(token.strip()):
            self.metrics.rejected.labels("unauthorized").inc()
            await _send_json(
                send,
                401,
                envelope(401, "missing or invalid API key: send 'Authorization: Bearer <key>'", code="invalid_api_key"),
                [(b"www-authenticate", b'Bearer realm="segquant"')],
            )
            return
        scope.setdefault("state", {})["principal"] = hashlib.sha256(token.strip().encode()).hexdigest()[:16]
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """413 for bodies over the limit: by Content-Length up front, or while reading a chunked body."""

    def __init__(self, app: ASGIApp, max_bytes: int, metrics: Metrics) -> None:
        self.app, self.max_bytes, self.metrics = app, max_bytes, metrics

    def _message(self) -> str:
        return f"request body too large (limit {self.max_bytes} bytes)"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            self.metrics.rejected.labels("body_too_large").inc()
            await _send_json(send, 413, envelope(413, self._message(), code="body_too_large"), [])
            return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    self.metrics.rejected.labels("body_too_large").inc()
                    raise HTTPException(413, self._message())
            return message

        await self.app(scope, limited, send)
