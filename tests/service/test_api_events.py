"""The SSE stream refuses a Last-Event-ID it cannot resume from with 400 before streaming, on both queues
(the Redis queue used to fail mid-stream with a ResponseError)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.service.helpers import live_server, make_settings, read_sse


@pytest.fixture(params=["local", "redis"])
def queue_settings(request: pytest.FixtureRequest, redis_url: str, key_prefix: str) -> dict[str, Any]:
    return {} if request.param == "local" else {"redis_url": redis_url, "key_prefix": key_prefix}


@pytest.mark.parametrize("last_event_id", ["not-an-id", "1-2-3", "99999999999999999999999-0", "$", "-5"])
async def test_a_bad_last_event_id_is_a_400(tmp_path: Path, queue_settings: dict[str, Any], last_event_id: str) -> None:
    settings = make_settings(tmp_path, embedded_worker=False, **queue_settings)
    async with live_server(settings) as url, httpx.AsyncClient(base_url=url, timeout=30) as c:
        job_id = (await c.post("/jobs", json={"prompt": "a red circle"})).json()["id"]
        r = await c.get(f"/jobs/{job_id}/events", headers={"Last-Event-ID": last_event_id})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == "Last-Event-ID" and err["code"] == "invalid_last_event_id"
        await c.delete(f"/jobs/{job_id}")  # a good id still works: the stream replays the end
        events = await read_sse(c, f"/jobs/{job_id}/events")
        assert [e for e, _, _ in events] == ["queued", "canceled"]
        replay = await read_sse(c, f"/jobs/{job_id}/events", headers={"Last-Event-ID": events[0][2]})
        assert [e for e, _, _ in replay] == ["canceled"]
