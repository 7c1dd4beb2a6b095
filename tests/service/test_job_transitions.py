"""Every row of the job state machine (service/jobs/transitions.py), driven through both queues: the Lua
scripts on a real Redis and the in-process queue must answer the same outcome and leave the same state."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from service.jobs.local_queue import LocalQueue
from service.jobs.model import JobError, JobState
from service.jobs.queue import Delivery
from service.jobs.redis_queue import RedisQueue
from service.jobs.transitions import REQUEUE_END, TRANSITIONS, Transition
from tests.service.helpers import KEY, make_job, result


@pytest.fixture(params=["local", "redis"])
async def queue(request: pytest.FixtureRequest, redis_url: str, key_prefix: str) -> AsyncIterator[Any]:
    q: Any = (
        LocalQueue(result_ttl_s=60)
        if request.param == "local"
        else RedisQueue(redis_url, prefix=key_prefix, result_ttl_s=60)
    )
    await q.prepare([KEY])
    yield q
    await q.close()


async def _arrange(q: Any, row: Transition) -> tuple[str, Delivery]:
    """A job in ``row.before`` under ``row.condition``; returns its id and the delivery the operation uses."""
    job = make_job(deadline_s=0.05 if row.condition == "deadline_passed" else None)
    await q.submit(job, capacity=10)
    [d] = await q.read([KEY], "w1", 1, 0)
    if row.condition == "deadline_passed":
        await asyncio.sleep(0.1)
    if row.condition == "stale_entry":  # handed back once: the old delivery's entry is no longer the job's
        await q.release(d, "w1")
        if row.before is JobState.RUNNING:
            [fresh] = await q.read([KEY], "w1", 1, 0)
            assert (await q.start(fresh, "w1")).status == "started"
        return job.id, d
    if row.before is not JobState.QUEUED:
        assert (await q.start(d, "w1")).status == "started"
    if row.condition == "cancel_requested":
        assert (await q.cancel(job.id))[1] == "cancel_requested"
    if row.before.terminal:
        assert await q.finish(job.id, row.before, result=result() if row.before is JobState.SUCCEEDED else None)
    assert (await q.get(job.id)).state is row.before
    return job.id, d


async def _apply(q: Any, row: Transition, job_id: str, d: Delivery) -> str:
    if row.op == "start":
        return str((await q.start(d, "w1")).status)
    if row.op == "finish":
        return "written" if await q.finish(job_id, JobState.SUCCEEDED, result=result(), worker_id="w1") else "unchanged"
    if row.op == "cancel":
        return str((await q.cancel(job_id))[1])
    if row.op == "release":
        return str(await q.release(d, "w2" if row.condition == "not_owner" else "w1"))
    if row.op == "dead_letter":
        return "written" if await q.dead_letter(d, "delivered too often") else "unchanged"
    assert row.op == "fail_queued"
    failed = await q.fail_queued(KEY, JobError(reason="unserved", message="nobody serves it"))
    return "written" if job_id in failed else "unchanged"


@pytest.mark.parametrize("row", TRANSITIONS, ids=lambda r: f"{r.op}-{r.before.value}-{r.condition or 'plain'}")
async def test_transition(queue: Any, row: Transition) -> None:
    job_id, delivery = await _arrange(queue, row)
    assert await _apply(queue, row, job_id, delivery) == row.outcome
    after = (await queue.get(job_id)).state
    assert after is (row.after or row.before)


async def test_a_handed_back_job_waits_behind_the_others(queue: Any) -> None:
    assert REQUEUE_END == "tail"
    first, second = make_job(prompt="first"), make_job(prompt="second")
    for j in (first, second):
        await queue.submit(j, capacity=10)
    [d] = await queue.read([KEY], "w1", 1, 0)
    assert d.job_id == first.id and (await queue.start(d, "w1")).status == "started"
    assert await queue.release(d, "w1") == "requeued"
    order = [x.job_id for x in await queue.read([KEY], "w2", 2, 0)]
    assert order == [second.id, first.id]
