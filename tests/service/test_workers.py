"""Worker processes on a real Redis: a SIGKILLed worker loses no job and none is recorded twice; a job that
always crashes its worker ends in the dead-letter stream; SIGTERM drains; worker metrics are scrapeable."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import redis

from service.jobs.constants import Keys
from service.settings import Settings
from tests.service.helpers import free_port, live_server, make_settings, spawn, stop, wait_state, write_config

CRASH_EXIT_CODE = 86


def worker_settings(tmp_path: Path, redis_url: str, key_prefix: str, **queue: Any) -> Settings:
    return make_settings(
        tmp_path,
        redis_url=redis_url,
        key_prefix=key_prefix,
        embedded_worker=False,
        debug_hooks=True,
        queue={"max_deliveries": 3, **queue},
        worker={"max_batch_size": 2, "drain_timeout_s": 60},
    )


def start_worker(tmp_path: Path, config: Path, name: str, port: int | None = None) -> subprocess.Popen[bytes]:
    args = ["worker", "--config", str(config), "--id", name]
    if port:
        args += ["--metrics-port", str(port)]
    return spawn(args, tmp_path / f"{name}.log")


async def wait_workers(
    c: httpx.AsyncClient, names: set[str], procs: list[subprocess.Popen[bytes]], timeout: float = 120
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        body = (await c.get("/readyz")).json()
        ready = {w["id"] for w in body["workers"] if w["state"] == "ready" and w["loaded"]}
        if names <= ready:
            return
        assert all(p.poll() is None for p in procs), "a worker exited during startup"
        assert time.monotonic() < deadline, body
        await asyncio.sleep(0.2)


async def test_killed_worker_loses_nothing_and_drain_finishes(tmp_path: Path, redis_url: str, key_prefix: str) -> None:
    settings = worker_settings(tmp_path, redis_url, key_prefix)
    config = write_config(tmp_path / "worker.json", settings)
    port_b = free_port()
    a = start_worker(tmp_path, config, "wA")
    b = start_worker(tmp_path, config, "wB", port_b)
    try:
        async with live_server(settings) as url, httpx.AsyncClient(base_url=url, timeout=60) as c:
            await wait_workers(c, {"wA", "wB"}, [a, b])
            slow = {"num_inference_steps": 12, "debug": {"step_delay_s": 0.05}}  # ~0.6 s per job
            ids = [
                (await c.post("/jobs", json={"prompt": f"shape {i}", "seed": i, **slow})).json()["id"]
                for i in range(20)
            ]
            victim = None
            for _ in range(600):  # catch worker A in the middle of a job, then kill it
                jobs = [r.json() for r in await asyncio.gather(*(c.get(f"/jobs/{i}") for i in ids))]
                victim = next(
                    (
                        j["id"]
                        for j in jobs
                        if j["state"] == "running"
                        and j["worker_id"] == "wA"
                        and j["progress"]
                        and j["progress"]["step"] <= 6
                    ),
                    None,
                )
                if victim:
                    break
                await asyncio.sleep(0.02)
            assert victim is not None, "worker A never ran a job"
            stop(a, signal.SIGKILL)

            done = [await wait_state(c, i, {"succeeded", "failed", "canceled", "expired"}, timeout=120) for i in ids]
            assert [d["state"] for d in done] == ["succeeded"] * 20
            victim_job = next(d for d in done if d["id"] == victim)
            assert victim_job["attempts"] >= 2 and victim_job["worker_id"] == "wB"
            r = redis.Redis.from_url(redis_url, decode_responses=True)
            keys = Keys(key_prefix)
            assert [r.hget(keys.job(i), "completions") for i in ids] == ["1"] * 20  # none recorded twice
            assert int(r.get(keys.queued_total()) or 0) == 0

            metrics = httpx.get(f"http://127.0.0.1:{port_b}/metrics").text  # the worker's own endpoint
            assert 'segquant_job_redeliveries_total{model="tiny",variant="fp"}' in metrics
            assert 'segquant_jobs_finished_total{model="tiny",outcome="succeeded",variant="fp"}' in metrics
            assert 'segquant_inference_seconds_count{model="tiny",variant="fp"}' in metrics

            # SIGTERM while a job runs: the worker finishes it, then exits cleanly
            long_id = (
                await c.post(
                    "/jobs", json={"prompt": "long", "num_inference_steps": 40, "debug": {"step_delay_s": 0.05}}
                )
            ).json()["id"]
            running = await wait_state(c, long_id, {"running"})
            b.send_signal(signal.SIGTERM)
            assert running["progress"] is None or running["progress"]["step"] < 40
            job = await wait_state(c, long_id, {"succeeded", "failed", "queued"}, timeout=120)
            assert job["state"] == "succeeded" and job["worker_id"] == "wB"
            assert b.wait(60) == 0
            assert (await c.get("/readyz")).status_code == 503  # no worker left
    finally:
        stop(a, signal.SIGKILL)
        stop(b, signal.SIGKILL)


async def test_a_job_that_always_crashes_its_worker_is_dead_lettered(
    tmp_path: Path, redis_url: str, key_prefix: str
) -> None:
    settings = worker_settings(tmp_path, redis_url, key_prefix, max_deliveries=1)
    config = write_config(tmp_path / "worker.json", settings)
    procs = {name: start_worker(tmp_path, config, name) for name in ("w1", "w2")}
    try:
        async with live_server(settings) as url, httpx.AsyncClient(base_url=url, timeout=60) as c:
            await wait_workers(c, set(procs), list(procs.values()))
            poison = (await c.post("/jobs", json={"prompt": "x", "debug": {"crash_worker": True}})).json()["id"]
            running = await wait_state(c, poison, {"running"})
            crashed = running["worker_id"]
            assert procs[crashed].wait(60) == CRASH_EXIT_CODE  # a real crash, mid-job
            # the other worker reclaims it: 2 deliveries > max_deliveries=1 → dead letter, not a second crash
            job = await wait_state(c, poison, {"failed", "succeeded"}, timeout=120)
            assert job["state"] == "failed" and job["error"]["reason"] == "worker_lost"
            assert "dead-letter" in job["error"]["message"]
            entries = redis.Redis.from_url(redis_url, decode_responses=True).xrange(Keys(key_prefix).dlq())
            assert [(e[1]["job_id"], e[1]["deliveries"]) for e in entries] == [(poison, "2")]
            survivor = next(name for name in procs if name != crashed)
            ok = (await c.post("/generate", json={"prompt": "a red circle"})).json()
            assert ok["worker_id"] == survivor  # and the fleet keeps serving
    finally:
        codes = {name: stop(p, signal.SIGTERM) for name, p in procs.items()}
    assert sorted(codes.values()) == [0, CRASH_EXIT_CODE]
