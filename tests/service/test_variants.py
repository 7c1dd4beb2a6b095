"""Variants: a missing artifact is built in the background on first use (few calibration samples here) and
cached; the next process loads it; /models reports state, weight bytes and fidelity; broken variants fail cleanly."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import httpx
import pytest

from service.registry import Registry
from service.worker.engine import Engine, resolve_precision
from tests.service.helpers import live_server, make_settings, tiny_models, wait_ready, wait_state

QUANT = {
    "name": "w8a8-segquant",
    "recipe": "w8a8-segquant",
    "calibration": {"samples": 2, "num_inference_steps": 2, "steps_per_prompt": 1},
}


def variant(models: dict, name: str) -> dict:
    return next(v for v in models["data"][0]["variants"] if v["name"] == name)


def _build_count(metrics: str) -> float:
    m = re.search(r'segquant_model_build_seconds_count\{model="tiny",variant="w8a8-segquant"\} ([0-9.]+)', metrics)
    return float(m.group(1)) if m else 0.0


async def test_build_on_first_use_then_reuse(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="service.worker.engine")
    settings = make_settings(tmp_path, models=tiny_models("fp", QUANT))
    artifact = tmp_path / "cache" / "tiny" / "w8a8-segquant"
    async with live_server(settings) as url, httpx.AsyncClient(base_url=url, timeout=120) as c:
        await wait_ready(c)
        builds_before = _build_count((await c.get("/metrics")).text)
        before = variant((await c.get("/models")).json(), "w8a8-segquant")
        assert before["state"] == "not_built" and before["artifact"] == str(artifact)
        job_id = (await c.post("/jobs", json={"prompt": "a red circle", "variant": "w8a8-segquant"})).json()["id"]
        seen = set()
        for _ in range(1200):
            seen.add(variant((await c.get("/models")).json(), "w8a8-segquant")["state"])
            if (await c.get(f"/jobs/{job_id}")).json()["state"] in ("succeeded", "failed"):
                break
            await asyncio.sleep(0.05)
        job = await wait_state(c, job_id, {"succeeded", "failed"})
        assert job["state"] == "succeeded", job["error"]
        assert "building" in seen
        assert job["result"]["timings"]["queue_wait_s"] > 0  # it waited in the queue while the variant was built
        assert (artifact / "manifest.json").is_file()
        (artifact / "eval.json").write_text(json.dumps({"psnr": 31.5, "ssim": 0.93}))
        models = (await c.get("/models")).json()
        q, fp = variant(models, "w8a8-segquant"), variant(models, "fp")
        assert q["state"] == "loaded" and q["recipe"] == "w8a8-segquant"
        assert q["precision"] == str(resolve_precision("auto", "cpu")).removeprefix("torch.")
        assert 0 < q["weight_bytes"] < fp["weight_bytes"]
        assert q["fidelity"] == {"psnr": 31.5, "ssim": 0.93} and fp["fidelity"] is None
        metrics = (await c.get("/metrics")).text
        # collectors are process-wide, so earlier tests may have built this variant too: exactly one more build
        assert _build_count(metrics) == builds_before + 1
        assert 'recipe="w8a8-segquant"' in metrics
    assert "building tiny:w8a8-segquant" in caplog.text

    # a new process finds the artifact: no calibration, just a load
    caplog.clear()
    (artifact / "eval.json").write_text(
        json.dumps(
            {
                "model": "tiny",
                "seeds": [0, 1],
                "variants": [{"variant": "fp", "psnr": 99.0}, {"variant": "w8a8-segquant", "psnr": 30.1, "ssim": 0.9}],
            }
        )
    )
    async with live_server(settings) as url, httpx.AsyncClient(base_url=url, timeout=120) as c:
        await wait_ready(c)
        assert variant((await c.get("/models")).json(), "w8a8-segquant")["state"] == "available"
        r = await c.post("/generate", json={"prompt": "a red circle", "variant": "w8a8-segquant"})
        assert r.status_code == 200 and r.json()["variant"] == "w8a8-segquant"
        q = variant((await c.get("/models")).json(), "w8a8-segquant")
        assert q["fidelity"]["psnr"] == 30.1 and q["fidelity"]["seeds"] == [0, 1]  # its entry of an eval report
    assert "building" not in caplog.text


async def test_a_variant_that_cannot_load_fails_its_jobs(tmp_path: Path) -> None:
    models = [
        *tiny_models(),
        {
            "name": "broken",
            "source": str(tmp_path / "missing-pipeline"),
            "variants": ["fp"],
            "sizes": {"multiple_of": 8, "min": 8, "max": 64, "default": 32},
        },
    ]
    settings = make_settings(tmp_path, models=models)
    async with live_server(settings) as url, httpx.AsyncClient(base_url=url, timeout=60) as c:
        await wait_ready(c)  # the tiny model loaded; the broken one did not
        r = await c.post("/generate", json={"prompt": "x", "model": "broken"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_unavailable"
        broken = next(m for m in (await c.get("/models")).json()["data"] if m["name"] == "broken")
        assert broken["variants"][0]["state"] == "failed" and "missing-pipeline" in broken["variants"][0]["reason"]
        assert (await c.post("/generate", json={"prompt": "x"})).status_code == 200  # the rest keeps working


def test_unknown_recipes_are_refused_at_startup(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, models=tiny_models("fp", {"name": "odd", "recipe": "w9a9"}))
    registry = Registry.from_settings(settings)
    with pytest.raises(ValueError, match=r"w9a9.*known recipes"):
        Engine(registry, settings).validate(registry.variant_keys())
