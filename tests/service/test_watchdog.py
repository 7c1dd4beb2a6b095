"""The progress watchdog: a call with no denoising step for worker.step_timeout_s is stalled. One that stops at
its next step fails its jobs with reason 'stalled' and the worker carries on; one that cannot be stopped makes
the worker process exit non-zero, and another worker reclaims and finishes the job."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx

from service.registry import VariantKey
from service.worker.watchdog import MIN_STEP_TIMEOUT_S, STALLED_EXIT_CODE, Watchdog
from tests.service.helpers import live_server, make_settings, spawn, stop, wait_ready, wait_state, write_config


def test_the_default_timeout_is_generous_and_derived_from_measured_steps() -> None:
    dog = Watchdog(None)
    key = VariantKey("m", "v")
    assert dog.limit(key) == MIN_STEP_TIMEOUT_S  # nothing measured yet
    dog.record(key, [0.01] * 10)
    assert dog.limit(key) == MIN_STEP_TIMEOUT_S  # never below 60 s
    dog.record(key, [9.0] * 30)
    assert dog.limit(key) == 20 * 9.0
    assert Watchdog(2.5).limit(key) == 2.5  # the setting wins


def test_a_call_that_does_not_stop_exits_the_process() -> None:
    exits: list[int] = []
    dog = Watchdog(1.0, exit_process=exits.append)
    call = dog.watch(VariantKey("m", "v"), ["job-1"])
    start = call.last_step
    dog.check(start + 0.5)
    assert not call.stalled.is_set()
    dog.check(start + 1.5)
    assert call.stalled.is_set() and not exits
    dog.check(start + 1.5 + 4.0)  # within the grace period (at least 5 s)
    assert not exits
    dog.check(start + 1.5 + 5.5)
    assert exits == [STALLED_EXIT_CODE]


async def test_a_stalled_call_fails_with_stalled_and_the_worker_keeps_serving(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, debug_hooks=True, worker={"step_timeout_s": 4.0})
    async with live_server(settings) as url, httpx.AsyncClient(base_url=url, timeout=60) as c:
        await wait_ready(c)
        slow = (await c.post("/jobs", json={"prompt": "a red circle", "debug": {"step_delay_s": 5.0}})).json()["id"]
        done = await wait_state(c, slow, {"succeeded", "failed"})
        assert done["state"] == "failed" and done["error"]["reason"] == "stalled"
        assert "no denoising step" in done["error"]["message"]
        r = await c.post("/generate", json={"prompt": "a red circle"})
        assert r.status_code == 200
        metrics = (await c.get("/metrics")).text
        assert 'reason="stalled"' in metrics


async def test_a_hung_call_makes_the_worker_exit_and_another_worker_reclaims_the_job(
    tmp_path: Path, redis_url: str, key_prefix: str
) -> None:
    settings = make_settings(
        tmp_path,
        redis_url=redis_url,
        key_prefix=key_prefix,
        embedded_worker=False,
        debug_hooks=True,
        worker={"step_timeout_s": 1.0, "warmup": False},
    )
    config = write_config(tmp_path / "worker.json", settings)
    hung = spawn(["worker", "--config", str(config), "--id", "hung"], tmp_path / "hung.log")
    rescuer = None
    try:
        async with live_server(settings) as url, httpx.AsyncClient(base_url=url, timeout=60) as c:
            job = (
                await c.post("/jobs", json={"prompt": "a red circle", "debug": {"hang_first_attempt": True}})
            ).json()["id"]
            deadline = time.monotonic() + 90
            while hung.poll() is None:
                assert time.monotonic() < deadline, "the worker with a hung call did not exit"
                await asyncio.sleep(0.2)
            assert hung.returncode == STALLED_EXIT_CODE
            assert "cannot be stopped" in (tmp_path / "hung.log").read_text()
            calm = settings.model_copy(update={"worker": settings.worker.model_copy(update={"step_timeout_s": None})})
            calm_config = write_config(tmp_path / "rescuer.json", calm)  # default timeout: its first step loads
            rescuer = spawn(["worker", "--config", str(calm_config), "--id", "rescuer"], tmp_path / "rescuer.log")
            done = await wait_state(c, job, {"succeeded", "failed"}, timeout=120)
            assert done["state"] == "succeeded" and done["attempts"] == 2 and done["worker_id"] == "rescuer"
    finally:
        stop(hung)
        if rescuer is not None:
            assert stop(rescuer) == 0
