"""The generation API end to end in embedded mode (in-process queue and worker, tiny random model)."""

from __future__ import annotations

import asyncio
import io
import json
import re
from collections.abc import AsyncIterator

import httpx
import numpy as np
import pytest
import pytest_asyncio
from PIL import Image

from service.worker.engine import resolve_precision
from tests.service.helpers import decode_image, live_server, make_settings, read_sse, wait_ready, wait_state

# bfloat16 on CPUs with AVX512-BF16 or AMX, else float32 (issue 15 deliverable 4)
CPU_PRECISION = str(resolve_precision("auto", "cpu")).removeprefix("torch.")

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def client(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[httpx.AsyncClient]:
    settings = make_settings(tmp_path_factory.mktemp("generate"), worker={"max_batch_size": 4}, debug_hooks=True)
    async with live_server(settings) as url, httpx.AsyncClient(base_url=url, timeout=60) as c:
        await wait_ready(c)
        yield c


async def blocker(client: httpx.AsyncClient, steps: int = 100) -> str:
    """A long job that keeps the single worker busy until it is canceled; returns its id once running."""
    r = await client.post(
        "/jobs", json={"prompt": "busy", "num_inference_steps": steps, "seed": 0, "debug": {"step_delay_s": 0.05}}
    )
    job_id = r.json()["id"]
    await wait_state(client, job_id, {"running"})
    return job_id


async def test_generate_returns_a_png_with_metadata(client: httpx.AsyncClient) -> None:
    r = await client.post("/generate", json={"prompt": "a red circle", "seed": 42, "n": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["seeds"] == [42, 43] and [i["seed"] for i in body["images"]] == [42, 43]
    assert (body["model"], body["variant"], body["precision"]) == ("tiny", "fp", CPU_PRECISION)
    assert (body["width"], body["height"], body["num_inference_steps"]) == (32, 32, 2)
    assert set(body["timings"]) >= {"queue_wait_s", "inference_s", "total_s"} and body["worker_id"]
    image = decode_image(body["images"][0]["b64_json"])
    assert image.format == "PNG" and image.size == (32, 32)
    params = json.loads(image.text["parameters"])  # the PNG says how it was made
    assert params["seed"] == 42 and params["prompt"] == "a red circle" and params["variant"] == "fp"


async def test_random_seed_is_reported(client: httpx.AsyncClient) -> None:
    body = (await client.post("/generate", json={"prompt": "a blue square"})).json()
    assert isinstance(body["seeds"][0], int) and body["images"][0]["seed"] == body["seeds"][0]


async def test_raw_image_with_accept_header(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/generate",
        json={"prompt": "a red circle", "seed": 5, "width": 16, "height": 24},
        headers={"Accept": "image/png"},
    )
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.headers["X-Seed"] == "5" and r.headers["X-Job-Id"]
    assert Image.open(io.BytesIO(r.content)).size == (16, 24)
    r = await client.post("/generate", json={"prompt": "a red circle"}, headers={"Accept": "image/webp"})
    assert r.headers["content-type"] == "image/webp" and Image.open(io.BytesIO(r.content)).format == "WEBP"


@pytest.mark.parametrize("fmt", ["jpeg", "webp"])
async def test_output_formats(client: httpx.AsyncClient, fmt: str) -> None:
    body = (await client.post("/generate", json={"prompt": "a star", "output_format": fmt})).json()
    assert body["images"][0]["format"] == fmt
    assert decode_image(body["images"][0]["b64_json"]).format == fmt.upper()


async def test_prefer_respond_async(client: httpx.AsyncClient) -> None:
    r = await client.post("/generate", json={"prompt": "a red circle"}, headers={"Prefer": "respond-async"})
    assert r.status_code == 202 and r.headers["Location"] == f"/jobs/{r.json()['id']}"
    job = await wait_state(client, r.json()["id"], {"succeeded"})
    assert job["result"]["images"][0]["b64_json"] and job["attempts"] == 1


async def test_openai_images_api(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/v1/images/generations",
        json={
            "prompt": "a green triangle",
            "n": 2,
            "size": "16x16",
            "response_format": "b64_json",
            "quality": "high",
            "seed": 9,
            "steps": 3,
            "guidance": 2.0,
            "negative_prompt": "blurry",
            "variant": "fp",
        },
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert isinstance(body["created"], int) and body["size"] == "16x16" and len(body["data"]) == 2
    assert [d["seed"] for d in body["data"]] == [9, 10]
    assert decode_image(body["data"][0]["b64_json"]).size == (16, 16)


async def test_sse_reports_every_step(client: httpx.AsyncClient) -> None:
    job_id = (await client.post("/jobs", json={"prompt": "a red circle", "num_inference_steps": 5})).json()["id"]
    events = await read_sse(client, f"/jobs/{job_id}/events")
    kinds = [e for e, _, _ in events]
    assert kinds[0] == "queued" and "started" in kinds and kinds[-1] == "succeeded"
    progress = [d for e, d, _ in events if e == "progress"]
    assert [p["step"] for p in progress] == [1, 2, 3, 4, 5] and {p["total"] for p in progress} == {5}
    final = events[-1][1]
    assert final["state"] == "succeeded" and final["result"]["images"]
    # reconnecting with Last-Event-ID replays only what came after it
    replay = await read_sse(client, f"/jobs/{job_id}/events", headers={"Last-Event-ID": events[-2][2]})
    assert [e for e, _, _ in replay] == ["succeeded"]


async def test_cancel_a_running_job_stops_between_steps(client: httpx.AsyncClient) -> None:
    job_id = await blocker(client)
    for _ in range(200):
        job = (await client.get(f"/jobs/{job_id}")).json()
        if job["progress"]:
            break
        await asyncio.sleep(0.02)
    r = await client.delete(f"/jobs/{job_id}")
    assert r.status_code == 202 and r.json()["cancel_requested"]
    job = await wait_state(client, job_id, {"canceled", "succeeded", "failed"})
    assert job["state"] == "canceled" and job["result"] is None
    assert job["progress"]["step"] < 100
    r = await client.delete(f"/jobs/{job_id}")
    assert r.status_code == 409 and r.json()["error"]["code"] == "job_finished"


async def test_queue_position_then_batching_keeps_seeds(client: httpx.AsyncClient) -> None:
    busy = await blocker(client)
    params = {"prompt": "a purple circle", "num_inference_steps": 3, "width": 16, "height": 16}
    ids = [(await client.post("/jobs", json={**params, "seed": s})).json()["id"] for s in (11, 12, 13)]
    queued = [(await client.get(f"/jobs/{i}")).json() for i in ids]
    assert [q["queue_position"] for q in queued] == [1, 2, 3]
    assert all(q["eta_s"] is not None and q["eta_s"] >= 0 for q in queued)
    await client.delete(f"/jobs/{busy}")
    batched = [await wait_state(client, i, {"succeeded"}) for i in ids]
    assert {b["result"]["batch_size"] for b in batched} == {3}  # one pipeline call for the three
    alone = (await client.post("/generate", json={**params, "seed": 12})).json()
    assert alone["batch_size"] == 1
    pixels_batched = np.asarray(decode_image(batched[1]["result"]["images"][0]["b64_json"]))
    pixels_alone = np.asarray(decode_image(alone["images"][0]["b64_json"]))
    assert np.array_equal(pixels_batched, pixels_alone)  # same seed, same image, batched or not
    other = np.asarray(decode_image(batched[0]["result"]["images"][0]["b64_json"]))
    assert not np.array_equal(other, pixels_alone)


async def test_idempotency_key(client: httpx.AsyncClient) -> None:
    body = {"prompt": "a yellow star", "seed": 3}
    first = await client.post("/jobs", json=body, headers={"Idempotency-Key": "order-17"})
    again = await client.post("/jobs", json=body, headers={"Idempotency-Key": "order-17"})
    assert first.status_code == 202 and again.status_code == 200 and again.headers["Idempotent-Replayed"] == "true"
    assert first.json()["id"] == again.json()["id"]
    clash = await client.post("/jobs", json={**body, "seed": 4}, headers={"Idempotency-Key": "order-17"})
    assert clash.status_code == 409 and clash.json()["error"]["code"] == "idempotency_key_reused"


async def test_models_and_metrics(client: httpx.AsyncClient) -> None:
    # make everything this test reads happen here, so it passes alone and in any order
    assert (await client.post("/generate", json={"prompt": "a red circle", "seed": 1})).status_code == 200
    blocked = await blocker(client)
    await client.delete(f"/jobs/{blocked}")
    await wait_state(client, blocked, {"canceled"})  # counted by the worker when it stops
    body = {"prompt": "a yellow star", "seed": 3}
    queued = await client.post("/jobs", json=body, headers={"Idempotency-Key": "metrics-test"})
    clash = await client.post("/jobs", json={**body, "seed": 4}, headers={"Idempotency-Key": "metrics-test"})
    assert clash.status_code == 409
    await wait_state(client, queued.json()["id"], {"succeeded"})  # the queue is empty again
    models = (await client.get("/models")).json()["data"]
    [model] = models
    assert model["sizes"] == {"multiple_of": 2, "min": 2, "max": 32, "default": 32}
    [fp] = model["variants"]
    assert fp["state"] == "loaded" and fp["precision"] == CPU_PRECISION and fp["device"] == "cpu"
    assert fp["weight_bytes"] > 0 and fp["peak_memory_bytes"] > 0 and fp["memory_kind"] == "process_rss"
    assert fp["latency"]["samples"] >= 1 and fp["latency"]["inference_p95_s"] >= fp["latency"]["inference_p50_s"]
    text = (await client.get("/metrics")).text
    for needle in (
        'segquant_inference_seconds_bucket{le="600.0",model="tiny",variant="fp"}',
        'segquant_queue_wait_seconds_count{model="tiny",variant="fp"}',
        'segquant_job_duration_seconds_count{model="tiny",variant="fp"}',
        'segquant_denoise_step_seconds_count{model="tiny",variant="fp"}',
        'segquant_batch_size_bucket{le="4.0",model="tiny",variant="fp"}',
        'segquant_request_duration_seconds_count{mode="sync",model="tiny",variant="fp"}',
        'segquant_model_load_seconds_count{model="tiny",variant="fp"}',
        'segquant_model_weight_bytes{model="tiny",variant="fp"}',
        'segquant_model_peak_memory_bytes{kind="process_rss",model="tiny",variant="fp"}',
        f'segquant_variant_info{{device="cpu",model="tiny",precision="{CPU_PRECISION}",recipe="fp",variant="fp"}} 1.0',
        'segquant_jobs_finished_total{model="tiny",outcome="canceled",variant="fp"}',
        'segquant_jobs_submitted_total{model="tiny",variant="fp"}',
        'segquant_queue_depth{model="tiny",variant="fp"} 0.0',
        'segquant_images_generated_total{model="tiny",variant="fp"}',
        'segquant_http_requests_total{method="POST",route="/generate",status="200"}',
        'segquant_rejected_requests_total{reason="idempotency_conflict"}',
        "segquant_build_info{",
    ):
        assert needle in text, needle
    assert not re.search(r"[0-9a-f]{32}", text) and "a red circle" not in text  # no job ids or prompts in labels
