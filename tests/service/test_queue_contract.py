"""The queue contract, run against both implementations: Redis Streams (real Redis) and in-process."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from service.jobs.local_queue import LocalQueue
from service.jobs.model import AdapterUse, JobError, JobState
from service.jobs.queue import IdempotencyConflictError, QueueFullError
from service.jobs.redis_queue import RedisQueue
from tests.service.helpers import KEY, OTHER, make_job, result


@pytest.fixture(params=["local", "redis"])
async def queue(request: pytest.FixtureRequest, redis_url: str, key_prefix: str) -> AsyncIterator[Any]:
    if request.param == "local":
        q: Any = LocalQueue(result_ttl_s=60)
    else:
        q = RedisQueue(redis_url, prefix=key_prefix, result_ttl_s=60)
    await q.prepare([KEY, OTHER])
    yield q
    await q.close()


async def test_submit_read_start_finish_ack(queue: Any) -> None:
    job = make_job()
    sub = await queue.submit(job, capacity=10)
    assert sub.created and sub.job.state is JobState.QUEUED
    assert await queue.total_depth() == 1 and (await queue.depths([KEY]))[KEY] == 1
    assert await queue.position(sub.job) == 1
    [d] = await queue.read([KEY], "w1", 4, 0)
    assert d.job_id == job.id and d.deliveries == 1
    started = await queue.start(d, "w1")
    assert started.status == "started" and started.job.state is JobState.RUNNING and started.job.attempts == 1
    assert await queue.total_depth() == 0
    await queue.progress(job.id, 1, 2)
    assert (await queue.get(job.id)).progress.step == 1
    assert await queue.finish(job.id, JobState.SUCCEEDED, result=result(), worker_id="w1")
    await queue.ack(d)
    done = await queue.get(job.id)
    assert done.state is JobState.SUCCEEDED and done.result is not None and done.finished_at is not None
    kinds = [e.type async for e in queue.events(job.id)]
    assert kinds == ["queued", "started", "progress", "succeeded"]


async def test_a_result_is_recorded_once(queue: Any) -> None:
    job = make_job()
    await queue.submit(job, capacity=10)
    [d] = await queue.read([KEY], "w1", 1, 0)
    await queue.start(d, "w1")
    assert await queue.finish(job.id, JobState.SUCCEEDED, result=result(), worker_id="w1")
    # a second completion (a redelivered copy, a stalled worker waking up) changes nothing
    assert not await queue.finish(job.id, JobState.FAILED, error=JobError(reason="internal", message="x"))
    assert not await queue.finish(job.id, JobState.SUCCEEDED, result=result(), worker_id="w2")
    final = await queue.get(job.id)
    assert final.state is JobState.SUCCEEDED and final.worker_id == "w1" and final.error is None
    terminal = [e.type async for e in queue.events(job.id) if e.terminal]
    assert terminal == ["succeeded"]


async def test_capacity_is_bounded(queue: Any) -> None:
    await queue.submit(make_job(), capacity=2)
    await queue.submit(make_job("w8"), capacity=2)
    with pytest.raises(QueueFullError) as e:
        await queue.submit(make_job(), capacity=2)
    assert (e.value.depth, e.value.capacity) == (2, 2)
    [d] = await queue.read([KEY], "w1", 1, 0)
    await queue.start(d, "w1")  # started jobs no longer count against the bound
    await queue.submit(make_job(), capacity=2)


async def test_idempotency_key_returns_the_same_job(queue: Any) -> None:
    first = await queue.submit(make_job(), capacity=10, idempotency_key="k", request_hash="h1")
    again = await queue.submit(make_job(), capacity=10, idempotency_key="k", request_hash="h1")
    assert not again.created and again.job.id == first.job.id
    assert await queue.total_depth() == 1
    with pytest.raises(IdempotencyConflictError):
        await queue.submit(make_job(), capacity=10, idempotency_key="k", request_hash="h2")


async def test_cancel_queued_and_running(queue: Any) -> None:
    queued = make_job()
    await queue.submit(queued, capacity=10)
    job, outcome = await queue.cancel(queued.id)
    assert outcome == "canceled" and job.state is JobState.CANCELED
    assert await queue.total_depth() == 0
    assert await queue.read([KEY], "w1", 4, 0) == []  # removed from the queue

    running = make_job()
    await queue.submit(running, capacity=10)
    [d] = await queue.read([KEY], "w1", 1, 0)
    await queue.start(d, "w1")
    job, outcome = await queue.cancel(running.id)
    assert outcome == "cancel_requested" and job.state is JobState.RUNNING and job.cancel_requested
    assert await queue.cancel_requested([running.id]) == {running.id}
    assert (await queue.cancel(queued.id))[1] == "terminal"
    assert (await queue.cancel("nope"))[1] == "missing"


async def test_deadline_expires_instead_of_running_late(queue: Any) -> None:
    job = make_job(deadline_s=0.05)
    await queue.submit(job, capacity=10)
    await asyncio.sleep(0.1)
    [d] = await queue.read([KEY], "w1", 1, 0)
    outcome = await queue.start(d, "w1")
    assert outcome.status == "expired"
    final = await queue.get(job.id)
    assert final.state is JobState.EXPIRED and final.error.reason == "expired"
    assert await queue.total_depth() == 0


async def test_release_hands_a_running_job_back(queue: Any) -> None:
    job = make_job()
    await queue.submit(job, capacity=10)
    [d] = await queue.read([KEY], "w1", 1, 0)
    await queue.start(d, "w1")
    await queue.release(d, "w1")
    assert (await queue.get(job.id)).state is JobState.QUEUED and await queue.total_depth() == 1
    [d2] = await queue.read([KEY], "w2", 1, 0)
    assert d2.job_id == job.id and d2.entry_id != d.entry_id
    assert (await queue.start(d, "w1")).status == "stale"  # the old entry no longer counts
    started = await queue.start(d2, "w2")
    assert started.status == "started" and started.job.attempts == 2


async def test_wait_and_events_follow_the_job(queue: Any) -> None:
    job = make_job()
    await queue.submit(job, capacity=10)

    async def work() -> None:
        await asyncio.sleep(0.1)
        [d] = await queue.read([KEY], "w1", 1, 0)
        await queue.start(d, "w1")
        for step in (1, 2):
            await queue.progress(job.id, step, 2)
        await queue.finish(job.id, JobState.SUCCEEDED, result=result(), worker_id="w1")

    worker = asyncio.create_task(work())
    done = await queue.wait(job.id, timeout=10)
    await worker
    assert done.state is JobState.SUCCEEDED
    events = [e async for e in queue.events(job.id)]
    assert [e.type for e in events] == ["queued", "started", "progress", "progress", "succeeded"]
    # replay from an event id (Last-Event-ID) gives only what came after it
    after = [e.type async for e in queue.events(job.id, after=events[2].id)]
    assert after == ["progress", "succeeded"]


async def test_positions_follow_submission_order(queue: Any) -> None:
    jobs = [make_job() for _ in range(3)]
    for j in jobs:
        await queue.submit(j, capacity=10)
    assert [await queue.position(await queue.get(j.id)) for j in jobs] == [1, 2, 3]
    [d] = await queue.read([KEY], "w1", 1, 0)
    await queue.start(d, "w1")
    assert await queue.position(await queue.get(jobs[1].id)) == 1


async def test_each_variant_has_its_own_share(queue: Any) -> None:
    for _ in range(2):
        await queue.submit(make_job(), capacity=10, variant_capacity=2)
    with pytest.raises(QueueFullError) as e:
        await queue.submit(make_job(), capacity=10, variant_capacity=2)
    assert (e.value.depth, e.value.capacity, e.value.variant) == (2, 2, "tiny:fp") and "tiny:fp" in str(e.value)
    await queue.submit(make_job("w8"), capacity=10, variant_capacity=2)  # the other variant still has room
    with pytest.raises(QueueFullError) as total:
        await queue.submit(make_job("w8"), capacity=3, variant_capacity=2)
    assert total.value.variant is None  # the global bound still holds


async def test_fail_queued_fails_only_that_variants_waiting_jobs(queue: Any) -> None:
    running, waiting, other = make_job(), make_job(), make_job("w8")
    for j in (running, waiting, other):
        await queue.submit(j, capacity=10)
    [d] = await queue.read([KEY], "w1", 1, 0)
    await queue.start(d, "w1")
    failed = await queue.fail_queued(KEY, JobError(reason="unserved", message="nobody serves tiny:fp"))
    assert failed == [waiting.id]
    states = {j.id: (await queue.get(j.id)).state for j in (running, waiting, other)}
    assert states == {running.id: JobState.RUNNING, waiting.id: JobState.FAILED, other.id: JobState.QUEUED}
    assert (await queue.get(waiting.id)).error.reason == "unserved"
    assert await queue.total_depth() == 1 and (await queue.depths([KEY, OTHER])) == {KEY: 0, OTHER: 1}
    assert await queue.fail_queued(KEY, JobError(reason="unserved", message="again")) == []


async def test_a_jobs_adapters_travel_with_it(queue: Any) -> None:
    job = make_job()
    job.params.loras = [AdapterUse(name="outlined", scale=2.0), AdapterUse(name="inked", scale=-0.5)]
    await queue.submit(job, capacity=10)
    assert (await queue.get(job.id)).params.loras == job.params.loras  # as queued
    [d] = await queue.read([KEY], "w1", 1, 0)
    started = await queue.start(d, "w1")
    assert started.job.params.loras == job.params.loras  # as the worker reads it, in the request's order
    assert started.job.params.batch_key() == job.params.batch_key()
