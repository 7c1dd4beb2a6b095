"""Every bad input gets the error envelope with the field and the reason; nothing reaches the queue.

These tests need no worker: the app runs with the in-process queue and no embedded worker.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio

from tests.service.helpers import live_server, make_settings

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def client(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[httpx.AsyncClient]:
    settings = make_settings(
        tmp_path_factory.mktemp("validation"),
        embedded_worker=False,
        limits={
            "max_prompt_chars": 50,
            "max_images": 3,
            "max_inference_steps": 10,
            "max_guidance_scale": 12.0,
            "max_body_bytes": 4096,
        },
    )
    async with live_server(settings) as url, httpx.AsyncClient(base_url=url, timeout=30) as c:
        yield c


def error_of(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body["error"]) >= {"message", "type", "param", "code"}
    return body["error"]


@pytest.mark.parametrize(
    ("body", "param", "reason"),
    [
        ({}, "prompt", "Field required"),
        ({"prompt": ""}, "prompt", "must not be empty"),
        ({"prompt": "   "}, "prompt", "must not be empty"),
        ({"prompt": "x" * 51}, "prompt", "at most 50 characters (got 51)"),
        ({"prompt": "ok", "negative_prompt": "y" * 60}, "negative_prompt", "at most 50 characters"),
        ({"prompt": "ok", "width": 33}, "width", "multiple of 2 (got 33)"),
        ({"prompt": "ok", "height": 31}, "height", "multiple of 2 (got 31)"),
        ({"prompt": "ok", "width": 64}, "width", "between 2 and 32 (got 64)"),
        ({"prompt": "ok", "height": 0}, "height", "greater than or equal to 1"),
        ({"prompt": "ok", "num_inference_steps": 0}, "num_inference_steps", "greater than or equal to 1"),
        ({"prompt": "ok", "num_inference_steps": 11}, "num_inference_steps", "between 1 and 10 (got 11)"),
        ({"prompt": "ok", "guidance_scale": -1}, "guidance_scale", "greater than or equal to 0"),
        ({"prompt": "ok", "guidance_scale": 13}, "guidance_scale", "between 0 and 12.0"),
        ({"prompt": "ok", "width": 10**15}, "width", "between 2 and 32"),
        ({"prompt": "ok", "n": 0}, "n", "greater than or equal to 1"),
        ({"prompt": "ok", "n": 4}, "n", "between 1 and 3 (got 4)"),
        ({"prompt": "ok", "output_format": "gif"}, "output_format", "'png', 'jpeg' or 'webp'"),
        ({"prompt": "ok", "seed": -1}, "seed", "greater than or equal to 0"),
        ({"prompt": "ok", "steps": 5}, "steps", "Extra inputs are not permitted"),
        ({"prompt": "ok", "debug": {"crash_worker": True}}, "debug", "debug hooks are disabled"),
        ({"prompt": 5}, "prompt", "valid string"),
        ({"prompt": "ok", "deadline_s": 5e-324}, "deadline_s", "greater than or equal to 1"),
        ({"prompt": "ok", "deadline_s": 0.5}, "deadline_s", "greater than or equal to 1"),
    ],
)
@pytest.mark.parametrize("route", ["/generate", "/jobs"])
async def test_bad_generation_requests(
    client: httpx.AsyncClient, route: str, body: dict[str, Any], param: str, reason: str
) -> None:
    err = error_of(await client.post(route, json=body), 422)
    assert err["param"] == param
    assert reason in err["message"]
    detail = (await client.post(route, json=body)).json()["detail"]
    assert detail[0]["loc"][-1] == param.split(".")[-1] and reason in detail[0]["msg"]


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        (b'{"prompt": "ok", "guidance_scale": NaN}', "guidance_scale"),
        (b'{"prompt": "ok", "guidance_scale": Infinity}', "guidance_scale"),
        (b'{"prompt": "ok", "deadline_s": Infinity}', "deadline_s"),
    ],
)
async def test_non_finite_numbers(client: httpx.AsyncClient, raw: bytes, param: str) -> None:
    r = await client.post("/jobs", content=raw, headers={"Content-Type": "application/json"})
    assert error_of(r, 422)["param"] == param


async def test_not_json(client: httpx.AsyncClient) -> None:
    r = await client.post("/generate", content=b"{not json", headers={"Content-Type": "application/json"})
    assert error_of(r, 422)["type"] == "invalid_request_error"


async def test_unknown_model_and_variant_list_valid_names(client: httpx.AsyncClient) -> None:
    err = error_of(await client.post("/generate", json={"prompt": "ok", "model": "sdxl"}), 404)
    assert err["param"] == "model" and err["valid"] == ["tiny"] and "tiny" in err["message"]
    err = error_of(await client.post("/jobs", json={"prompt": "ok", "variant": "int2"}), 404)
    assert err["param"] == "variant" and err["valid"] == ["fp"]


async def test_unknown_job_ids(client: httpx.AsyncClient) -> None:
    for method, path in (("GET", "/jobs/nope"), ("DELETE", "/jobs/nope"), ("GET", "/jobs/nope/events")):
        err = error_of(await client.request(method, path), 404)
        assert err["code"] == "unknown_job"
    assert error_of(await client.get("/no/such/route"), 404)["code"] == "not_found"


async def test_body_size_limit(client: httpx.AsyncClient) -> None:
    r = await client.post("/generate", json={"prompt": "x" * 5000})
    err = error_of(r, 413)
    assert err["code"] == "body_too_large" and "4096" in err["message"]

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted while reading
        yield b'{"prompt": "'
        for _ in range(10):
            yield b"x" * 1000
        yield b'"}'

    r = await client.post("/jobs", content=chunks(), headers={"Content-Type": "application/json"})
    assert error_of(r, 413)["code"] == "body_too_large"


@pytest.mark.parametrize(
    ("body", "param", "reason"),
    [
        ({"prompt": "ok", "size": "33x32"}, "size", "multiple of 2"),
        ({"prompt": "ok", "size": "huge"}, "size", "WIDTHxHEIGHT"),
        ({"prompt": "ok", "response_format": "url"}, "response_format", "only 'b64_json'"),
        ({"prompt": "ok", "n": 9}, "n", "between 1 and 3"),
        ({"prompt": "ok", "steps": 99}, "num_inference_steps", "between 1 and 10"),
        ({"prompt": ""}, "prompt", "must not be empty"),
    ],
)
async def test_bad_openai_requests(client: httpx.AsyncClient, body: dict[str, Any], param: str, reason: str) -> None:
    err = error_of(await client.post("/v1/images/generations", json=body), 422)
    assert err["param"] == param and reason in err["message"]


async def test_raw_image_needs_n_1(client: httpx.AsyncClient) -> None:
    r = await client.post("/generate", json={"prompt": "ok", "n": 2}, headers={"Accept": "image/png"})
    assert error_of(r, 422)["param"] == "n"


async def test_api_keys(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, embedded_worker=False, api_keys=["s3cret-key"])
    async with live_server(settings) as url, httpx.AsyncClient(base_url=url, timeout=30) as c:
        assert (await c.get("/healthz")).status_code == 200
        assert (await c.get("/readyz")).status_code == 503  # open, but no worker: not ready
        for path in ("/models", "/metrics", "/docs", "/openapi.json"):
            r = await c.get(path)
            assert r.status_code == 401 and r.headers["WWW-Authenticate"].startswith("Bearer"), path
            assert r.json()["error"]["type"] == "authentication_error"
        r = await c.post("/jobs", json={"prompt": "ok"}, headers={"Authorization": "Bearer wrong"})
        assert error_of(r, 401)["code"] == "invalid_api_key"
        good = {"Authorization": "Bearer s3cret-key"}
        assert (await c.get("/models", headers=good)).status_code == 200
        assert (await c.post("/jobs", json={"prompt": "ok"}, headers=good)).status_code == 202


async def test_openai_schema_says_what_the_route_accepts(client: httpx.AsyncClient) -> None:
    """The published schema and the validation agree: what the route refuses, the schema does not allow."""
    import re

    schema = (await client.get("/openapi.json")).json()["components"]["schemas"]
    body = schema["OpenAIImageRequest"]["properties"]
    assert body["response_format"].get("enum", [body["response_format"].get("const")]) == ["b64_json"]
    size = re.compile(body["size"]["pattern"])  # applies to the string branch (null stays allowed)
    assert size.search("32x32") and size.search("auto") and not size.search("huge")
    for name in ("OpenAIImageRequest", "GenerateRequest"):
        assert re.search(schema[name]["properties"]["prompt"]["pattern"], "ok")
        assert not re.search(schema[name]["properties"]["prompt"]["pattern"], "   ")
    deadline = schema["GenerateRequest"]["properties"]["deadline_s"]["anyOf"][0]
    assert deadline["minimum"] == 1
