"""Backpressure, queued-job cancellation, deadlines, sync timeouts (no worker), and OOM handling (a worker
with a per-call memory budget: an oversized call fails with ``oom`` and the worker keeps serving)."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import pytest_asyncio

import segquant_shapes
from service.worker.memory import estimate_call_bytes
from tests.service.helpers import live_server, make_settings, metric_value, read_sse, wait_ready, wait_state

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def idle(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[httpx.AsyncClient]:
    """An API whose queue nobody reads: jobs stay queued."""
    settings = make_settings(
        tmp_path_factory.mktemp("idle"),
        embedded_worker=False,
        queue={"max_depth": 3, "default_service_s": 2.5},
        limits={"sync_timeout_s": 0.3},
    )
    async with live_server(settings) as url, httpx.AsyncClient(base_url=url, timeout=30) as c:
        yield c


async def test_overload_answers_503_with_retry_after(idle: httpx.AsyncClient) -> None:
    ids = []
    for _ in range(5):
        r = await idle.post("/jobs", json={"prompt": "a red circle"})
        if r.status_code != 202:
            break
        ids.append(r.json()["id"])
    assert r.status_code == 503 and len(ids) == 3
    err = r.json()["error"]
    assert err["code"] == "queue_full" and err["type"] == "service_unavailable"
    # depth 3 × 2.5 s assumed service time ÷ 1 worker
    assert int(r.headers["Retry-After"]) == math.ceil(3 * 2.5)
    assert (await idle.post("/v1/images/generations", json={"prompt": "x"})).status_code == 503
    metrics = (await idle.get("/metrics")).text
    assert 'segquant_rejected_requests_total{reason="queue_full"}' in metrics
    assert 'segquant_queue_depth{model="tiny",variant="fp"} 3.0' in metrics
    for job_id in ids:  # cancel them: room again
        r = await idle.delete(f"/jobs/{job_id}")
        assert r.status_code == 200 and r.json()["state"] == "canceled"
    assert (await idle.post("/jobs", json={"prompt": "x"})).status_code == 202
    await idle.delete(f"/jobs/{(await idle.post('/jobs', json={'prompt': 'x'})).json()['id']}")


async def test_cancel_queued_job_ends_its_event_stream(idle: httpx.AsyncClient) -> None:
    job_id = (await idle.post("/jobs", json={"prompt": "a red circle"})).json()["id"]
    job = (await idle.get(f"/jobs/{job_id}")).json()
    assert job["state"] == "queued" and job["queue_position"] >= 1 and job["eta_s"] is not None

    async def cancel_soon() -> None:
        await asyncio.sleep(0.3)
        await idle.delete(f"/jobs/{job_id}")

    task = asyncio.create_task(cancel_soon())
    events = await read_sse(idle, f"/jobs/{job_id}/events")
    await task
    assert [e for e, _, _ in events] == ["queued", "canceled"]
    assert events[0][1]["queue_position"] >= 1
    assert events[-1][1]["state"] == "canceled" and events[-1][1]["error"]["reason"] == "canceled"
    assert (await idle.get("/readyz")).status_code == 503  # no worker


async def test_deadline_expires_a_queued_job(idle: httpx.AsyncClient) -> None:
    job_id = (await idle.post("/jobs", json={"prompt": "a red circle", "deadline_s": 1})).json()["id"]
    job = await wait_state(idle, job_id, {"expired"}, timeout=30)  # nobody reads the queue: it expires
    assert job["error"]["reason"] == "expired"


async def test_sync_request_turns_async_when_the_wait_runs_out(idle: httpx.AsyncClient) -> None:
    r = await idle.post("/generate", json={"prompt": "a red circle"})
    assert r.status_code == 202 and r.json()["state"] == "queued" and r.headers["Location"].startswith("/jobs/")
    await idle.delete(r.headers["Location"])


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def budgeted(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[httpx.AsyncClient]:
    """A worker whose memory budget fits one 32x32 image per call, not two (fp32 pinned: the estimate scales
    with the precision, which ``auto`` picks per CPU)."""
    config = dict(segquant_shapes.models.PRESETS["mmdit-tiny"])
    one = estimate_call_bytes(config, images=1, height=32, width=32, guidance=True, dtype_bytes=4)
    settings = make_settings(
        Path(tmp_path_factory.mktemp("oom")),
        worker={"memory_budget_bytes": one + one // 2},
        precision="float32",
        debug_hooks=True,
    )
    async with live_server(settings) as url, httpx.AsyncClient(base_url=url, timeout=60) as c:
        await wait_ready(c)
        yield c


async def test_out_of_memory_fails_the_job_and_the_worker_keeps_serving(budgeted: httpx.AsyncClient) -> None:
    oom = {"model": "tiny", "reason": "oom", "variant": "fp"}
    before = metric_value((await budgeted.get("/metrics")).text, "segquant_jobs_failed_total", **oom)
    r = await budgeted.post("/generate", json={"prompt": "a red circle", "n": 2})
    err = r.json()["error"]
    assert r.status_code == 500 and err["code"] == "oom" and "budget" in err["message"]
    job = (await budgeted.get(f"/jobs/{err['job_id']}")).json()
    assert job["state"] == "failed" and job["error"]["reason"] == "oom"
    assert (await budgeted.post("/generate", json={"prompt": "a red circle"})).status_code == 200
    assert (
        await budgeted.post("/generate", json={"prompt": "x", "n": 2, "width": 16, "height": 16})
    ).status_code == 200  # two small images fit
    after = metric_value((await budgeted.get("/metrics")).text, "segquant_jobs_failed_total", **oom)
    assert after - before == 1  # this test's one oom (the collectors are process-wide)


async def test_a_batch_over_budget_is_retried_one_by_one(
    budgeted: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("WARNING", logger="service.worker.runner")
    busy = (
        await budgeted.post(
            "/jobs", json={"prompt": "busy", "num_inference_steps": 100, "debug": {"step_delay_s": 0.05}}
        )
    ).json()["id"]
    await wait_state(budgeted, busy, {"running"})
    ids = [(await budgeted.post("/jobs", json={"prompt": "a red circle", "seed": s})).json()["id"] for s in (1, 2)]
    await budgeted.delete(f"/jobs/{busy}")
    done = [await wait_state(budgeted, i, {"succeeded", "failed"}) for i in ids]
    assert [d["state"] for d in done] == ["succeeded", "succeeded"]
    assert [d["result"]["batch_size"] for d in done] == [1, 1]
    assert "batch of 2 jobs ran out of memory" in caplog.text  # they were read together, then split
