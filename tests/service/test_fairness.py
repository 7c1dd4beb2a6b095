"""Per-variant fairness: each variant has its own share of the queue, and jobs for a variant that no live
worker serves fail (after ``queue.unserved_timeout_s``) with a reason naming it — on both queues."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.service.helpers import live_server, make_settings, tiny_models, wait_ready, wait_state

QUANT = {"name": "w8", "recipe": "w8a8-segquant"}


@pytest.fixture(params=["local", "redis"])
def queue_settings(request: pytest.FixtureRequest, redis_url: str, key_prefix: str) -> dict[str, Any]:
    return {} if request.param == "local" else {"redis_url": redis_url, "key_prefix": key_prefix}


async def test_one_variants_backlog_leaves_room_for_the_others(tmp_path: Path, queue_settings: dict[str, Any]) -> None:
    settings = make_settings(
        tmp_path, models=tiny_models("fp", QUANT), embedded_worker=False, queue={"max_depth": 4}, **queue_settings
    )
    async with live_server(settings) as url, httpx.AsyncClient(base_url=url, timeout=30) as c:
        codes = [(await c.post("/jobs", json={"prompt": "x", "variant": "w8"})).status_code for _ in range(3)]
        assert codes == [202, 202, 503]  # 4 shared by 2 variants: 2 each
        full = (await c.post("/jobs", json={"prompt": "x", "variant": "w8"})).json()["error"]
        assert full["code"] == "queue_full" and "tiny:w8" in full["message"]
        assert (await c.post("/jobs", json={"prompt": "x", "variant": "fp"})).status_code == 202


async def test_a_variant_nobody_serves_fails_with_a_reason_naming_it(
    tmp_path: Path, queue_settings: dict[str, Any]
) -> None:
    settings = make_settings(
        tmp_path,
        models=tiny_models("fp", QUANT),
        embedded_worker=True,
        worker={"variants": ["tiny:fp"]},
        queue={"unserved_timeout_s": 0.5},
        **queue_settings,
    )
    async with live_server(settings) as url, httpx.AsyncClient(base_url=url, timeout=30) as c:
        await wait_ready(c)
        waiting = (await c.post("/jobs", json={"prompt": "x", "variant": "w8"})).json()
        assert waiting["state"] == "queued"  # the timeout has not run out yet
        job = await wait_state(c, waiting["id"], {"failed", "succeeded"}, timeout=30)
        assert job["error"]["reason"] == "unserved" and "tiny:w8" in job["error"]["message"]
        fast = await c.post("/generate", json={"prompt": "x", "variant": "w8"})  # now it fails at once
        assert fast.status_code == 503 and fast.json()["error"]["code"] == "unserved"
        assert "tiny:w8" in fast.json()["error"]["message"]
        served = await c.post("/generate", json={"prompt": "x", "variant": "fp"})
        assert served.status_code == 200, served.text
        metrics = (await c.get("/metrics")).text
        assert 'segquant_jobs_failed_total{model="tiny",reason="unserved",variant="w8"}' in metrics
