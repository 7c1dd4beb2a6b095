"""One generation request and what came back: outcome, client latency, server-side timings."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import httpx


@dataclass
class Sample:
    variant: str
    started: float  # seconds since the run began
    latency_s: float  # client-observed, request to full response
    status: int  # HTTP status (0: transport error)
    outcome: str  # ok | rejected (503) | error
    queue_wait_s: float | None = None
    inference_s: float | None = None
    server_total_s: float | None = None
    batch_size: int | None = None
    detail: str = ""


async def generate(client: httpx.AsyncClient, body: dict[str, Any], variant: str, t0: float) -> Sample:
    start = time.perf_counter()
    try:
        resp = await client.post("/generate", json=body)
    except httpx.HTTPError as e:
        return Sample(variant, start - t0, time.perf_counter() - start, 0, "error", detail=type(e).__name__)
    latency = time.perf_counter() - start
    if resp.status_code == 503:
        return Sample(variant, start - t0, latency, 503, "rejected", detail=resp.headers.get("retry-after", ""))
    if resp.status_code != 200:
        return Sample(variant, start - t0, latency, resp.status_code, "error", detail=resp.text[:200])
    data = resp.json()
    timings = data.get("timings", {})
    return Sample(
        variant,
        start - t0,
        latency,
        200,
        "ok",
        timings.get("queue_wait_s"),
        timings.get("inference_s"),
        timings.get("total_s"),
        data.get("batch_size"),
    )
