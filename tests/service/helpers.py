"""Helpers for the service tests: tiny-model settings, live servers, subprocesses, SSE, a private Redis.

Models are tiny random pipelines (``source: tiny:mmdit``), so a generation takes a fraction of a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from service.jobs.model import GenerationParams, Job, JobResult, JobState, Timings
from service.registry import VariantKey
from service.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_REDIS = "redis://127.0.0.1:6379/0"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def reachable(url: str) -> bool:
    try:
        redis.Redis.from_url(url, socket_connect_timeout=1).ping()
        return True
    except redis.RedisError:
        return False


class RedisServer:
    """A private ``redis-server`` (no persistence), stopped by PID."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        if shutil.which("redis-server") is None:
            pytest.skip("redis-server is not on PATH")
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not reachable(self.url):
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None


def tiny_models(*variants: str, steps: int = 2, **extra: Any) -> list[dict[str, Any]]:
    """A registry with the tiny random MMDiT (32x32 pixel space, sizes multiple of 2)."""
    variant_list: list[Any] = list(variants or ["fp"])
    return [
        {
            "name": "tiny",
            "source": "tiny:mmdit",
            "variants": variant_list,
            "defaults": {"num_inference_steps": steps, "guidance_scale": 3.0},
            **extra,
        }
    ]


def make_settings(tmp_path: Path, *, models: list[dict[str, Any]] | None = None, **overrides: Any) -> Settings:
    """Settings for tests: tiny model, fast heartbeats, small limits; ``overrides`` win (nested dicts merge)."""
    base: dict[str, Any] = {
        "models": models or tiny_models(),
        "cache_dir": str(tmp_path / "cache"),
        "queue": {"heartbeat_interval_s": 0.2, "reclaim_idle_s": 1.5, "max_depth": 64, "default_service_s": 0.5},
        "worker": {"batch_wait_ms": 0, "drain_timeout_s": 5, "cancel_poll_s": 0.05},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return load_settings(None, **base)


@contextlib.asynccontextmanager
async def live_server(settings: Settings) -> AsyncIterator[str]:
    """The app under uvicorn in this event loop, on a free port; yields the base URL."""
    import uvicorn

    from service.api.app import create_app

    port = free_port()
    config = uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        deadline = time.monotonic() + 60
        while not server.started:
            if task.done():
                task.result()
            if time.monotonic() > deadline:
                raise RuntimeError("server did not start")
            await asyncio.sleep(0.02)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, timeout=30)


async def wait_ready(client: httpx.AsyncClient, timeout: float = 60.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            r = await client.get("/readyz")
            if r.status_code == 200:
                return r.json()
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError("service never became ready")
        await asyncio.sleep(0.1)


async def wait_state(client: httpx.AsyncClient, job_id: str, states: set[str], timeout: float = 60.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        r = await client.get(f"/jobs/{job_id}")
        assert r.status_code == 200, r.text
        job = r.json()
        if job["state"] in states:
            return job
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} stuck in {job['state']}")
        await asyncio.sleep(0.05)


def write_config(path: Path, settings: Settings) -> Path:
    """A JSON settings file for subprocesses (the same settings the test uses)."""
    path.write_text(settings.model_dump_json(exclude={"api_keys"}))
    return path


def spawn(args: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start ``python -m segquant_cli ARGS`` from the repository root (so ``service`` imports)."""
    # one thread per process: several workers and the test share two cores
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen(
        [sys.executable, "-m", "segquant_cli", *args],
        cwd=ROOT,
        env=full_env,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 30) -> int:
    """Stop a process we started, by its PID; returns its exit status."""
    if proc.poll() is None:
        os.kill(proc.pid, sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
    return int(proc.returncode)


async def read_sse(
    client: httpx.AsyncClient, path: str, headers: dict[str, str] | None = None, stop_after: str | None = None
) -> list[tuple[str, dict[str, Any], str]]:
    """(event, data, id) of every server-sent event until the stream ends (or ``stop_after`` arrives)."""
    import json

    events: list[tuple[str, dict[str, Any], str]] = []
    current: dict[str, str] = {}
    async with client.stream("GET", path, headers=headers) as r:
        assert r.status_code == 200, await r.aread()
        assert r.headers["content-type"].startswith("text/event-stream")
        async for line in r.aiter_lines():
            if not line:
                if "data" in current:
                    events.append((current.get("event", "message"), json.loads(current["data"]), current.get("id", "")))
                    if stop_after is not None and events[-1][0] == stop_after:
                        return events
                current = {}
                continue
            if line.startswith(":"):
                continue
            field, _, value = line.partition(":")
            current[field] = value.removeprefix(" ")
    return events


def decode_image(b64: str) -> Any:
    import base64
    import io

    from PIL import Image

    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


KEY = VariantKey("tiny", "fp")
OTHER = VariantKey("tiny", "w8")


def make_job(variant: str = "fp", deadline_s: float | None = None, prompt: str = "a red circle") -> Job:
    """A queued job for the tiny model, as the API would build it."""
    now = time.time()
    params = GenerationParams(
        prompt=prompt,
        model="tiny",
        variant=variant,
        width=32,
        height=32,
        num_inference_steps=2,
        guidance_scale=3.0,
        seeds=[1],
    )
    return Job(
        id=Job.new_id(),
        state=JobState.QUEUED,
        params=params,
        created_at=now,
        deadline_at=None if deadline_s is None else now + deadline_s,
    )


def result() -> JobResult:
    return JobResult(images=[], timings=Timings(queue_wait_s=0, inference_s=0, total_s=0), worker_id="w", batch_size=1)


def metric_value(text: str, name: str, **labels: str) -> float:
    """The value of one sample in a Prometheus text page (0 when absent): compare before/after, since the
    collectors are process-wide and other tests in the same process count too."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return 0.0
