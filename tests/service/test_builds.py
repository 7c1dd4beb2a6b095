"""Builds out of the request path, embedded and against a real Redis: background build, waiting jobs, the build
route, failed builds, build_on_demand: false, fidelity at build time, one build per artifact across workers.

A build is held at a known point without any mock: its calibration prompts file is a named pipe (FIFO), so
the build's thread blocks reading it until the test writes the prompts.
"""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.registry import Registry, VariantKey
from service.settings import Settings
from service.worker.build_progress import BuildTracker
from service.worker.engine import Engine
from tests.service.helpers import live_server, make_settings, tiny_models, wait_ready, wait_state

# Not in the Shapes held-out split, so evaluation prompts stay disjoint from these.
CALIBRATION_PROMPTS = "calibration prompt one\ncalibration prompt two\n"
VARIANT = "w8a8-segquant"


def quantized(prompts_file: Path, **calibration: Any) -> dict[str, Any]:
    return {
        "name": VARIANT,
        "recipe": VARIANT,
        "calibration": {
            "samples": 2,
            "num_inference_steps": 2,
            "steps_per_prompt": 1,
            "prompts_file": str(prompts_file),
            **calibration,
        },
    }


def feed(fifo: Path) -> threading.Thread:
    """Write the prompts into the pipe (the build reads them once, then calibrates and evaluates)."""

    def writer() -> None:
        with open(fifo, "w") as f:
            f.write(CALIBRATION_PROMPTS)

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    return thread


def variant(models: dict[str, Any], name: str) -> dict[str, Any]:
    return next(v for v in models["data"][0]["variants"] if v["name"] == name)


async def wait_variant(c: httpx.AsyncClient, name: str, states: set[str], timeout: float = 120) -> dict[str, Any]:
    for _ in range(int(timeout / 0.05)):
        v = variant((await c.get("/models")).json(), name)
        if v["state"] in states:
            return v
        await asyncio.sleep(0.05)
    raise AssertionError(f"variant {name} never reached {states}: {v}")


@pytest.fixture(params=["embedded", "redis"])
def settings_for(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    def make(models: list[dict[str, Any]]) -> Settings:
        if request.param == "embedded":
            return make_settings(tmp_path, models=models)
        prefix = request.getfixturevalue("key_prefix")
        return make_settings(
            tmp_path,
            models=models,
            redis_url=request.getfixturevalue("redis_url"),
            key_prefix=prefix,
            embedded_worker=True,
        )

    return make


async def test_a_job_triggers_a_background_build_and_waits_while_other_variants_serve(
    settings_for: Any, tmp_path: Path
) -> None:
    pipe = tmp_path / "prompts.fifo"
    os.mkfifo(pipe)
    settings = settings_for(tiny_models("fp", quantized(pipe), eval={"prompts": 2}))
    async with live_server(settings) as url, httpx.AsyncClient(base_url=url, timeout=60) as c:
        await wait_ready(c)
        trigger = (await c.post("/jobs", json={"prompt": "a red circle", "variant": VARIANT})).json()["id"]
        building = await wait_variant(c, VARIANT, {"building"})
        assert building["progress"]["phase"] in ("waiting for the build lock", "loading")
        waiting = (await c.get(f"/jobs/{trigger}")).json()
        assert waiting["state"] == "queued" and waiting["waiting_for_build"]["phase"]
        second = (await c.post("/jobs", json={"prompt": "a blue square", "variant": VARIANT, "seed": 3})).json()["id"]
        # the build is held on the pipe: the fp variant keeps being served meanwhile
        r = await c.post("/generate", json={"prompt": "a green triangle"})
        assert r.status_code == 200 and r.json()["variant"] == "fp"
        assert variant((await c.get("/models")).json(), VARIANT)["state"] == "building"
        # canceling the job that triggered the build does not stop the build
        assert (await c.delete(f"/jobs/{trigger}")).json()["state"] == "canceled"
        feed(pipe)
        ready = await wait_variant(c, VARIANT, {"available", "loaded"})
        done = await wait_state(c, second, {"succeeded", "failed"}, timeout=120)
        assert done["state"] == "succeeded", done["error"]
        assert done["result"]["timings"]["queue_wait_s"] > 0
        fidelity = variant((await c.get("/models")).json(), VARIANT)["fidelity"]
        assert ready["progress"] is None
        assert fidelity["variant"] == VARIANT and fidelity["eval_prompt_count"] == 2 and fidelity["seeds"] == [0]
        assert fidelity["num_inference_steps"] == 2 and 0 < fidelity["ssim"] <= 1
        assert "shape" in fidelity["adherence"]  # shipped-style models also report prompt adherence
        metrics = (await c.get("/metrics")).text
        assert f'segquant_variant_psnr_db{{model="tiny",variant="{VARIANT}"}}' in metrics
        assert (await c.get(f"/jobs/{trigger}")).json()["state"] == "canceled"


async def test_the_build_route_and_build_on_request_models(settings_for: Any, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(CALIBRATION_PROMPTS)
    settings = settings_for(tiny_models("fp", quantized(prompts), build_on_demand=False, eval={"prompts": 0}))
    async with live_server(settings) as url, httpx.AsyncClient(base_url=url, timeout=60) as c:
        await wait_ready(c)
        r = await c.post("/jobs", json={"prompt": "a red circle", "variant": VARIANT})
        err = r.json()["error"]
        assert r.status_code == 409 and err["code"] == "variant_not_built"
        assert f"POST /models/tiny/variants/{VARIANT}/build" in err["message"]
        assert (await c.post("/models/tiny/variants/fp/build")).status_code == 409  # nothing to build
        assert (await c.post("/models/tiny/variants/nope/build")).status_code == 404
        r = await c.post(f"/models/tiny/variants/{VARIANT}/build")
        assert r.status_code == 202 and r.json()["workers"] == 1 and r.headers["Location"] == "/models"
        await wait_variant(c, VARIANT, {"available", "loaded"})
        assert (await c.post(f"/models/tiny/variants/{VARIANT}/build")).status_code == 200  # already built
        r = await c.post("/generate", json={"prompt": "a red circle", "variant": VARIANT})
        assert r.status_code == 200, r.text
        assert variant((await c.get("/models")).json(), VARIANT)["fidelity"] is None  # eval: {prompts: 0}


async def test_a_failed_build_fails_its_waiting_jobs_with_the_reason(settings_for: Any, tmp_path: Path) -> None:
    settings = settings_for(tiny_models("fp", quantized(tmp_path / "no-such-prompts.txt")))
    async with live_server(settings) as url, httpx.AsyncClient(base_url=url, timeout=60) as c:
        await wait_ready(c)
        job = (await c.post("/jobs", json={"prompt": "a red circle", "variant": VARIANT})).json()["id"]
        done = await wait_state(c, job, {"succeeded", "failed"})
        assert done["state"] == "failed" and done["error"]["reason"] == "model_unavailable"
        assert "build failed" in done["error"]["message"] and "no-such-prompts.txt" in done["error"]["message"]
        failed = variant((await c.get("/models")).json(), VARIANT)
        assert failed["state"] == "failed" and "no-such-prompts.txt" in failed["reason"]
        r = await c.post("/generate", json={"prompt": "a red circle", "variant": VARIANT})  # fails fast now
        assert r.status_code == 503 and "build failed" in r.json()["error"]["message"]
        assert (await c.post(f"/models/tiny/variants/{VARIANT}/build")).status_code == 202  # a retry is allowed


def test_two_workers_never_build_the_same_artifact_twice(tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(CALIBRATION_PROMPTS)
    settings = make_settings(tmp_path, models=tiny_models("fp", quantized(prompts), eval={"prompts": 0}))
    engines = [Engine(Registry.from_settings(settings), settings) for _ in range(2)]
    key = VariantKey("tiny", VARIANT)
    outcomes: list[Any] = []
    threads = [threading.Thread(target=lambda e=e: outcomes.append(e.build(key, BuildTracker(key)))) for e in engines]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(o.built_here for o in outcomes) == [False, True]
    assert all(e.status(key).state == "available" for e in engines)
