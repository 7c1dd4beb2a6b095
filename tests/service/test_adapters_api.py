"""LoRA adapters through the API, embedded and on a real Redis: the shipped ``outlined`` adapter on the shipped
MMDiT (fp and w8a8-segquant, 2 steps at 32x32) changes the image, repeats exactly, batches only with its own
set, is listed by ``GET /models``, counted in the metrics, and every bad request is refused before queueing."""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import pytest_asyncio
import redis

from service.registry import shipped_checkpoint_dir, shipped_dir
from tests.service.helpers import decode_image, live_server, make_settings, metric_value, wait_ready, wait_state

pytestmark = pytest.mark.asyncio(loop_scope="module")

MODEL = "shapes"
PROMPT = "an outlined red circle on a blue background"
CARD = json.loads(((shipped_dir("mmdit") or Path()) / "loras" / "outlined" / "lora.json").read_text())


def shapes_registry() -> list[dict[str, Any]]:
    """The shipped MMDiT with fp, its shipped w8a8 checkpoint and the shipped adapter (defaults from its card)."""
    w8a8 = shipped_checkpoint_dir("mmdit", "w8a8-segquant")
    assert w8a8 is not None, "the shipped w8a8-segquant checkpoint is missing"
    return [
        {
            "name": MODEL,
            "source": "shipped:mmdit",
            "defaults": {"num_inference_steps": 2, "guidance_scale": 3.0},
            "eval": {"prompts": 0},
            "variants": ["fp", {"name": "w8a8-segquant", "recipe": "w8a8-segquant", "artifact": str(w8a8)}],
            "adapters": [{"name": "outlined", "path": "shipped:mmdit/outlined"}],
        }
    ]


@pytest_asyncio.fixture(loop_scope="module", scope="module", params=["embedded", "redis"])
async def client(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, redis_url: str
) -> AsyncIterator[httpx.AsyncClient]:
    mode = request.param
    prefix = f"sqtest-{uuid.uuid4().hex[:10]}"
    queue_mode: dict[str, Any] = (
        {"redis_url": redis_url, "key_prefix": prefix, "embedded_worker": True} if mode == "redis" else {}
    )
    settings = make_settings(
        tmp_path_factory.mktemp(f"adapters-{mode}"),
        models=shapes_registry(),
        worker={"max_batch_size": 4},
        debug_hooks=True,
        **queue_mode,
    )
    try:
        async with live_server(settings) as url, httpx.AsyncClient(base_url=url, timeout=120) as c:
            await wait_ready(c, timeout=180)
            yield c
    finally:
        if mode == "redis":  # only this module's keys
            client = redis.Redis.from_url(redis_url)
            keys = list(client.scan_iter(match=f"{prefix}:*", count=500))
            if keys:
                client.delete(*keys)


def pixels(image: dict[str, Any]) -> np.ndarray:
    return np.asarray(decode_image(image["b64_json"])).astype(np.int16)


async def generate(client: httpx.AsyncClient, **body: Any) -> dict[str, Any]:
    r = await client.post("/generate", json={"prompt": PROMPT, "model": MODEL, "seed": 7, **body})
    assert r.status_code == 200, r.text
    return r.json()


async def test_models_lists_each_models_adapters(client: httpx.AsyncClient) -> None:
    [model] = (await client.get("/models")).json()["data"]
    assert model["adapters"] == [
        {"name": "outlined", "scale": CARD["default_scale"], "description": CARD["description"], "trigger": "outlined"}
    ]


@pytest.mark.parametrize("variant", ["fp", "w8a8-segquant"])
async def test_adapter_changes_the_image_and_repeats_exactly(client: httpx.AsyncClient, variant: str) -> None:
    labels = {"model": MODEL, "adapter": "outlined"}
    before = (await client.get("/metrics")).text
    plain = await generate(client, variant=variant)
    adapted = await generate(client, variant=variant, loras=[{"name": "outlined"}])
    again = await generate(client, variant=variant, loras=[{"name": "outlined"}])
    plain_again = await generate(client, variant=variant)  # still loaded, but off for a call without it
    assert plain["loras"] == []
    assert np.array_equal(pixels(plain_again["images"][0]), pixels(plain["images"][0]))
    assert adapted["loras"] == [{"name": "outlined", "scale": CARD["default_scale"]}]  # the card's default
    diff = np.abs(pixels(adapted["images"][0]) - pixels(plain["images"][0]))
    assert diff.max() > 32, "the adapter did not change the image"
    assert np.array_equal(pixels(adapted["images"][0]), pixels(again["images"][0]))
    job = (await client.get(f"/jobs/{adapted['id']}")).json()
    assert job["params"]["loras"] == adapted["loras"]
    meta = json.loads(decode_image(adapted["images"][0]["b64_json"]).text["parameters"])
    assert meta["loras"] == adapted["loras"]  # the PNG says which adapters made it
    after = (await client.get("/metrics")).text
    jobs = metric_value(after, "segquant_adapter_jobs_total", **labels) - metric_value(
        before, "segquant_adapter_jobs_total", **labels
    )
    loads = metric_value(after, "segquant_adapter_loads_total", **labels) - metric_value(
        before, "segquant_adapter_loads_total", **labels
    )
    assert jobs == 2
    assert loads <= 1  # once per variant's denoiser, kept for the repeat (0 if an earlier test loaded it)
    assert metric_value(after, "segquant_adapter_loads_total", **labels) >= 1


async def test_a_scale_is_applied_and_zero_is_no_adapter(client: httpx.AsyncClient) -> None:
    plain = await generate(client)
    zero = await generate(client, loras=[{"name": "outlined", "scale": 0.0}])
    half = await generate(client, loras=[{"name": "outlined", "scale": 0.5}])
    full = await generate(client, loras=[{"name": "outlined", "scale": 3.0}])
    assert np.array_equal(pixels(zero["images"][0]), pixels(plain["images"][0]))
    weak = np.abs(pixels(half["images"][0]) - pixels(plain["images"][0])).mean()
    strong = np.abs(pixels(full["images"][0]) - pixels(plain["images"][0])).mean()
    assert 0 < weak < strong


async def test_batches_never_mix_adapter_sets(client: httpx.AsyncClient) -> None:
    busy = await client.post(
        "/jobs", json={"prompt": "busy", "model": MODEL, "num_inference_steps": 40, "debug": {"step_delay_s": 0.1}}
    )
    await wait_state(client, busy.json()["id"], {"running"})
    bodies = [
        {"seed": 1},
        {"seed": 2, "loras": [{"name": "outlined", "scale": 2.0}]},
        {"seed": 3, "loras": [{"name": "outlined", "scale": 2.0}]},
        {"seed": 4, "loras": [{"name": "outlined", "scale": 1.0}]},
    ]
    ids = [(await client.post("/jobs", json={"prompt": PROMPT, "model": MODEL, **b})).json()["id"] for b in bodies]
    await client.delete(f"/jobs/{busy.json()['id']}")  # the four are now read in one go
    done = [await wait_state(client, i, {"succeeded", "failed"}) for i in ids]
    assert [d["state"] for d in done] == ["succeeded"] * 4, [d.get("error") for d in done]
    assert [d["result"]["batch_size"] for d in done] == [1, 2, 2, 1]  # same set and scale: one call; else apart
    assert [d["params"]["loras"] for d in done] == [b.get("loras", []) for b in bodies]
    alone = await generate(client, seed=2, loras=[{"name": "outlined", "scale": 2.0}])
    assert alone["batch_size"] == 1
    assert np.array_equal(pixels(done[1]["result"]["images"][0]), pixels(alone["images"][0]))  # seeds per sample


async def test_openai_route_takes_loras(client: httpx.AsyncClient) -> None:
    loras = [{"name": "outlined", "scale": 1.5}]
    r = await client.post("/v1/images/generations", json={"prompt": PROMPT, "model": MODEL, "seed": 7, "loras": loras})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["loras"] == loras
    native = await generate(client, loras=loras)
    assert np.array_equal(pixels(body["data"][0]), pixels(native["images"][0]))


@pytest.mark.parametrize("route", ["/generate", "/jobs", "/v1/images/generations"])
async def test_an_unknown_adapter_is_404_listing_the_known_ones(client: httpx.AsyncClient, route: str) -> None:
    r = await client.post(route, json={"prompt": PROMPT, "model": MODEL, "loras": [{"name": "sketchy"}]})
    assert r.status_code == 404, r.text
    error = r.json()["error"]
    assert error["code"] == "unknown_adapter" and error["valid"] == ["outlined"]
    assert "'sketchy'" in error["message"] and "outlined" in error["message"] and MODEL in error["message"]


@pytest.mark.parametrize(
    ("loras", "param", "words"),
    [
        ([{"name": "outlined", "scale": 4.5}], "loras.0.scale", "between -4 and 4"),
        ([{"name": "outlined", "scale": -9}], "loras.0.scale", "between -4 and 4"),
        ([{"name": "outlined"}, {"name": "outlined", "scale": 1}], "loras", "repeated: outlined"),
        ([{"name": f"a{i}"} for i in range(4)], "loras", "at most 3"),
        ([{"name": "outlined", "scale": "strong"}], "loras.0.scale", "number"),
        ([{"name": ""}], "loras.0.name", "at least 1"),
        ([{"name": "outlined", "weight": 1}], "loras.0.weight", "not permitted"),
        ({"name": "outlined"}, "loras", "list"),
    ],
)
@pytest.mark.parametrize("route", ["/generate", "/v1/images/generations"])
async def test_bad_loras_are_422_naming_the_field(
    client: httpx.AsyncClient, route: str, loras: Any, param: str, words: str
) -> None:
    r = await client.post(route, json={"prompt": PROMPT, "model": MODEL, "loras": loras})
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["param"] == param and words in error["message"], error


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
async def test_a_scale_that_is_not_finite_is_422(client: httpx.AsyncClient, value: float) -> None:
    body = json.dumps({"prompt": PROMPT, "model": MODEL, "loras": [{"name": "outlined", "scale": value}]})
    r = await client.post("/generate", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["param"] == "loras.0.scale" and "finite" in r.json()["error"]["message"]


async def test_the_openapi_schema_says_which_adapters_and_scales_are_accepted(client: httpx.AsyncClient) -> None:
    schemas = (await client.get("/openapi.json")).json()["components"]["schemas"]
    assert schemas["LoraRequest"]["properties"]["name"]["enum"] == ["outlined"]
    scale = next(b for b in schemas["LoraRequest"]["properties"]["scale"]["anyOf"] if b["type"] == "number")
    assert (scale["minimum"], scale["maximum"]) == (-4.0, 4.0)
    for body in ("GenerateRequest", "OpenAIImageRequest"):
        assert schemas[body]["properties"]["loras"]["maxItems"] == 3
