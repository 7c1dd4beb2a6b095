"""Start-up loads only the first served model's default variant (the embedded default lists three models);
every other model loads on its first job."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from tests.service.helpers import live_server, make_settings, wait_ready

DEFAULTS = {"num_inference_steps": 2, "guidance_scale": 3.0}


def _states(models: dict[str, Any]) -> dict[str, str]:
    return {f"{m['name']}:{v['name']}": v["state"] for m in models["data"] for v in m["variants"]}


async def test_only_the_first_model_is_loaded_at_start(tmp_path: Path) -> None:
    models = [
        {"name": "first", "source": "tiny:mmdit", "variants": ["fp"], "defaults": DEFAULTS},
        {"name": "second", "source": "tiny:unet", "variants": ["fp"], "defaults": DEFAULTS},
    ]
    settings = make_settings(tmp_path, models=models, worker={"warmup": False})
    assert settings.worker.preload is None
    async with live_server(settings) as url, httpx.AsyncClient(base_url=url, timeout=120) as c:
        await wait_ready(c)
        assert _states((await c.get("/models")).json()) == {"first:fp": "loaded", "second:fp": "available"}
        r = await c.post("/generate", json={"prompt": "a red circle", "model": "second", "seed": 1})
        assert r.status_code == 200, r.text
        assert r.json()["model"] == "second"
        assert _states((await c.get("/models")).json()) == {"first:fp": "loaded", "second:fp": "loaded"}
