"""Redis-specific guarantees: reclaim of a dead worker's entries, heartbeats that prevent it, the
dead-letter stream, and surviving a Redis restart (the API answers 503 meanwhile, the worker reconnects)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx

from service.jobs.constants import GROUP, Keys
from service.jobs.model import JobEvent, JobState
from service.jobs.queue import Delivery
from service.jobs.redis_queue import RedisQueue
from tests.service.helpers import (
    KEY,
    RedisServer,
    live_server,
    make_job,
    make_settings,
    result,
    tiny_models,
    wait_ready,
    wait_state,
)


async def test_idle_entries_are_reclaimed_and_counted(redis_url: str, key_prefix: str) -> None:
    q = RedisQueue(redis_url, prefix=key_prefix, result_ttl_s=60)
    await q.prepare([KEY])
    job = make_job()
    await q.submit(job, capacity=10)
    [d] = await q.read([KEY], "dead", 1, 0)
    await q.start(d, "dead")  # ...and the worker dies here
    assert await q.reclaim([KEY], "alive", min_idle_s=5, count=4) == []  # not idle long enough yet
    [again] = await reclaim_when_idle(q, "alive", min_idle_s=0.2, count=4)
    assert again.job_id == job.id and again.deliveries == 2
    started = await q.start(again, "alive")
    assert started.status == "started" and started.job.attempts == 2 and started.job.worker_id == "alive"
    assert await q.finish(job.id, JobState.SUCCEEDED, result=result(), worker_id="alive")
    await q.ack(again)
    assert not await q.finish(job.id, JobState.SUCCEEDED, result=result(), worker_id="dead")
    assert await q.redis.hget(Keys(key_prefix).job(job.id), "completions") == "1"
    assert (await q.redis.xpending(Keys(key_prefix).stream(KEY), GROUP))["pending"] == 0
    await q.close()


async def test_heartbeat_keeps_a_live_job_from_being_reclaimed(redis_url: str, key_prefix: str) -> None:
    """Heartbeats over twice the idle time keep the entry; once they stop it is taken over. Each check
    refreshes right before reclaiming, so a slow, busy machine cannot make a live entry look idle."""
    idle_s = 1.0
    q = RedisQueue(redis_url, prefix=key_prefix, result_ttl_s=60)
    await q.prepare([KEY])
    await q.submit(make_job(), capacity=10)
    [d] = await q.read([KEY], "w1", 1, 0)
    beating_since = time.monotonic()
    while time.monotonic() - beating_since < 2 * idle_s:
        assert await q.refresh([d], "w1") == set()
        assert await q.reclaim([KEY], "w2", min_idle_s=idle_s, count=4) == []
        await asyncio.sleep(idle_s / 4)
    assert await q.refresh([d], "w1") == set()
    [stolen] = await reclaim_when_idle(q, "w2", min_idle_s=idle_s, count=4)  # w1 stalls: no heartbeat
    assert stolen.entry_id == d.entry_id
    assert await q.refresh([d], "w1") == {d.entry_id}  # w1 learns it lost the entry, and does not take it back
    pending = await q.redis.xpending_range(Keys(key_prefix).stream(KEY), GROUP, "-", "+", 10)
    assert [p["consumer"] for p in pending] == ["w2"]
    await q.close()


async def reclaim_when_idle(
    q: RedisQueue, consumer: str, *, min_idle_s: float, count: int, timeout: float = 30.0
) -> list[Delivery]:
    """Reclaim as soon as something has been idle long enough (a condition with a deadline, not a sleep)."""
    deadline = time.monotonic() + timeout
    while True:
        got = await q.reclaim([KEY], consumer, min_idle_s=min_idle_s, count=count)
        if got:
            return got
        assert time.monotonic() < deadline, f"nothing idle for {min_idle_s} s was reclaimed in {timeout} s"
        await asyncio.sleep(min_idle_s / 4)


async def test_a_stalled_worker_cannot_hand_back_a_job_it_lost(redis_url: str, key_prefix: str) -> None:
    q = RedisQueue(redis_url, prefix=key_prefix, result_ttl_s=60)
    await q.prepare([KEY])
    job = make_job()
    await q.submit(job, capacity=10)
    [d] = await q.read([KEY], "w1", 1, 0)
    await q.start(d, "w1")
    [taken] = await reclaim_when_idle(q, "w2", min_idle_s=0.2, count=1)
    assert (await q.start(taken, "w2")).status == "started"
    await q.release(d, "w1")  # w1 wakes up draining: the job is w2's now
    current = await q.get(job.id)
    assert current.state is JobState.RUNNING and current.worker_id == "w2"
    pending = await q.redis.xpending_range(Keys(key_prefix).stream(KEY), GROUP, "-", "+", 10)
    assert [p["consumer"] for p in pending] == ["w2"]  # w2's entry was not acknowledged away
    await q.close()


async def test_dead_letter_marks_the_job_failed(redis_url: str, key_prefix: str) -> None:
    q = RedisQueue(redis_url, prefix=key_prefix, result_ttl_s=60)
    await q.prepare([KEY])
    job = make_job()
    await q.submit(job, capacity=10)
    [d] = await q.read([KEY], "w1", 1, 0)
    await q.start(d, "w1")
    d.deliveries = 4
    assert await q.dead_letter(d, "delivered 4 times")
    failed = await q.get(job.id)
    assert failed.state is JobState.FAILED and failed.error.reason == "worker_lost"
    [entry] = await q.dead_letters()
    assert entry["job_id"] == job.id and entry["deliveries"] == "4"
    assert (await q.redis.xpending(Keys(key_prefix).stream(KEY), GROUP))["pending"] == 0
    await q.close()


async def test_survives_a_redis_restart(tmp_path: Path) -> None:
    first = RedisServer().start()
    second = RedisServer(first.port)
    try:
        settings = make_settings(tmp_path, redis_url=first.url, embedded_worker=True, key_prefix="restart")
        async with live_server(settings) as url, httpx.AsyncClient(base_url=url, timeout=30) as c:
            await wait_ready(c)
            ok = await c.post("/generate", json={"prompt": "a red circle", "seed": 1})
            assert ok.status_code == 200, ok.text

            first.stop()
            down = await c.post("/jobs", json={"prompt": "a red circle"})
            assert down.status_code == 503 and down.headers["Retry-After"].isdigit()
            assert down.json()["error"]["code"] == "queue_unavailable"
            assert (await c.get("/healthz")).status_code == 200
            assert (await c.get("/readyz")).status_code == 503
            assert (await c.get("/metrics")).status_code == 200

            second.start()  # same port, no data: streams and groups are gone
            again = None
            for _ in range(100):
                again = await c.post("/jobs", json={"prompt": "a red circle", "seed": 1})
                if again.status_code == 202:
                    break
                await asyncio.sleep(0.1)
            assert again is not None and again.status_code == 202, again.text if again else None
            job = await wait_state(c, again.json()["id"], {"succeeded", "failed"})
            assert job["state"] == "succeeded"  # the worker reconnected and recreated its group
    finally:
        first.stop()
        second.stop()


async def test_drain_hands_a_running_job_back(tmp_path: Path, redis_url: str, key_prefix: str) -> None:
    """SIGTERM-style shutdown with no drain time: the running job goes back to the queue, and the next
    worker runs it (nothing lost)."""
    settings = make_settings(
        tmp_path,
        redis_url=redis_url,
        key_prefix=key_prefix,
        embedded_worker=True,
        worker={"drain_timeout_s": 0},
        debug_hooks=True,
    )
    async with live_server(settings) as url, httpx.AsyncClient(base_url=url, timeout=30) as c:
        await wait_ready(c)
        job_id = (
            await c.post("/jobs", json={"prompt": "long", "num_inference_steps": 20, "debug": {"step_delay_s": 0.05}})
        ).json()["id"]
        await wait_state(c, job_id, {"running"})
    q = RedisQueue(redis_url, prefix=key_prefix, result_ttl_s=60)
    handed_back = await q.get(job_id)
    assert handed_back is not None and handed_back.state is JobState.QUEUED and handed_back.attempts == 1
    assert "requeued" in [e.type async for e in _until(q.events(job_id), "requeued")]
    await q.close()
    async with live_server(settings) as url, httpx.AsyncClient(base_url=url, timeout=30) as c:
        job = await wait_state(c, job_id, {"succeeded", "failed"})
        assert job["state"] == "succeeded" and job["attempts"] == 2


async def _until(events: AsyncIterator[JobEvent], kind: str) -> AsyncIterator[JobEvent]:
    async for event in events:
        yield event
        if event.type == kind:
            return


async def test_jobs_route_only_to_workers_serving_their_variant(
    tmp_path: Path, redis_url: str, key_prefix: str
) -> None:
    quant = {"name": "w8", "recipe": "w8a8-segquant"}
    settings = make_settings(
        tmp_path,
        models=tiny_models("fp", quant),
        redis_url=redis_url,
        key_prefix=key_prefix,
        embedded_worker=True,
        worker={"variants": ["tiny:fp"]},
    )
    async with live_server(settings) as url, httpx.AsyncClient(base_url=url, timeout=30) as c:
        await wait_ready(c)
        waiting = (await c.post("/jobs", json={"prompt": "x", "variant": "w8"})).json()["id"]
        done = (await c.post("/generate", json={"prompt": "x", "variant": "fp"})).json()
        assert done["variant"] == "fp"
        job = (await c.get(f"/jobs/{waiting}")).json()
        assert job["state"] == "queued" and job["queue_position"] == 1  # nobody serves w8: it waits
        [worker] = (await c.get("/readyz")).json()["workers"]
        assert worker["loaded"] == ["tiny:fp"]
        w8 = next(v for v in (await c.get("/models")).json()["data"][0]["variants"] if v["name"] == "w8")
        assert w8["state"] == "not_built" and w8["workers_loaded"] == 0
        await c.delete(f"/jobs/{waiting}")


async def test_a_dead_workers_entry_behind_many_live_ones_is_reclaimed(redis_url: str, key_prefix: str) -> None:
    """150 pending entries held by live, heartbeating workers, then one of a dead worker: XAUTOCLAIM scans at
    most 10 × COUNT entries per call, so reclaim must follow its cursor to reach the dead one."""
    idle_s, count = 0.5, 4
    q = RedisQueue(redis_url, prefix=key_prefix, result_ttl_s=60)
    await q.prepare([KEY])
    for _ in range(151):
        await q.submit(make_job(), capacity=1000)
    held = {f"live-{i}": await q.read([KEY], f"live-{i}", 15, 0) for i in range(10)}
    [dead] = await q.read([KEY], "dead", 1, 0)
    assert sum(len(v) for v in held.values()) == 150

    async def heartbeat() -> None:
        while True:
            for consumer, deliveries in held.items():
                assert await q.refresh(deliveries, consumer) == set()
            await asyncio.sleep(idle_s / 5)

    beating = asyncio.create_task(heartbeat())
    try:
        await asyncio.sleep(idle_s + 0.1)
        rounds = [await q.reclaim([KEY], "rescuer", min_idle_s=idle_s, count=count) for _ in range(2)]
    finally:
        beating.cancel()
    reclaimed = [d for r in rounds for d in r]
    assert [(d.job_id, d.entry_id, d.deliveries) for d in reclaimed] == [(dead.job_id, dead.entry_id, 2)]
    pending = await q.redis.xpending_range(Keys(key_prefix).stream(KEY), GROUP, "-", "+", 200)
    assert sorted({p["consumer"] for p in pending}) == sorted([*held, "rescuer"])
    await q.close()


async def test_delivery_counts_come_from_one_range_and_skip_other_held_entries(redis_url: str, key_prefix: str) -> None:
    """The rescuer already holds entries between the ones it reclaims: their counts must not leak in."""
    q = RedisQueue(redis_url, prefix=key_prefix, result_ttl_s=60)
    await q.prepare([KEY])
    for _ in range(5):
        await q.submit(make_job(), capacity=10)
    [a] = await q.read([KEY], "dead", 1, 0)
    [mine] = await q.read([KEY], "rescuer", 1, 0)
    [b] = await q.read([KEY], "dead", 1, 0)
    await asyncio.sleep(0.25)
    assert await q.refresh([mine], "rescuer") == set()
    got = await q.reclaim([KEY], "rescuer", min_idle_s=0.2, count=10)
    assert [(d.entry_id, d.deliveries) for d in got] == [(a.entry_id, 2), (b.entry_id, 2)]
    again = await q.reclaim([KEY], "other", min_idle_s=0.0, count=10)
    assert {d.entry_id: d.deliveries for d in again} == {a.entry_id: 3, mine.entry_id: 2, b.entry_id: 3}
    await q.close()
