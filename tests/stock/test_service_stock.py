"""The embedded service on tiny stock pipelines: SD3 saved without T5, SD3 served with ``drop_components``,
Flux (sizes from its 8× VAE and 2×2 packing) and SDXL; ``/models`` shows components and calibration
conditions, ``/generate`` works for fp and a quantized variant (built at the serving size and guidance)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio

from tests.service.helpers import decode_image, live_server, make_settings, wait_ready

pytestmark = pytest.mark.asyncio(loop_scope="module")

FAST = {"num_inference_steps": 2, "guidance_scale": 2.5}
CALIB = {"samples": 2, "steps_per_prompt": 1}


def _registry(dirs: dict[str, Path]) -> list[dict[str, Any]]:
    return [
        {
            "name": "sd3-no-t5",
            "source": str(dirs["sd3-no-t5"]),
            "defaults": FAST,
            "variants": ["fp", {"name": "int8", "recipe": "w8a8-segquant", "calibration": CALIB}],
        },
        {
            "name": "sd3-drop",
            "source": str(dirs["sd3"]),
            "drop_components": ["text_encoder_3"],
            "defaults": FAST,
            "variants": ["fp"],
        },
        {"name": "flux", "source": str(dirs["flux"]), "sizes": {"default": 64}, "defaults": FAST, "variants": ["fp"]},
        {"name": "sdxl", "source": str(dirs["sdxl"]), "defaults": FAST, "variants": ["fp"]},
    ]


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def served(
    tmp_path_factory: pytest.TempPathFactory, stock_dirs: dict[str, Path]
) -> AsyncIterator[tuple[httpx.AsyncClient, Path]]:
    root = tmp_path_factory.mktemp("stock-service")
    settings = make_settings(root, models=_registry(stock_dirs), worker={"max_loaded_variants": 8})
    async with live_server(settings) as url, httpx.AsyncClient(base_url=url, timeout=300) as c:
        await wait_ready(c, timeout=300)
        yield c, root / "cache"


async def test_models_lists_components_sizes_and_calibration(served: tuple[httpx.AsyncClient, Path]) -> None:
    client, _ = served
    models = {m["name"]: m for m in (await client.get("/models")).json()["data"]}
    for name in ("sd3-no-t5", "sd3-drop"):
        components = set(models[name]["components"])
        assert {"transformer", "vae", "text_encoder", "text_encoder_2"} <= components
        assert not components & {"text_encoder_3", "tokenizer_3"}
    assert models["sd3-drop"]["drop_components"] == ["text_encoder_3"]
    assert models["flux"]["sizes"] == {"multiple_of": 16, "min": 16, "max": 2048, "default": 64}
    assert models["sd3-no-t5"]["sizes"]["multiple_of"] == 4  # 2× tiny VAE × patch 2, not 8 × 2
    int8 = next(v for v in models["sd3-no-t5"]["variants"] if v["name"] == "int8")
    assert int8["calibration"] == {
        "height": 64,
        "width": 64,
        "num_inference_steps": 2,
        "guidance_scale": 2.5,
        "samples": 2,
        "steps_per_prompt": 1,
    }


@pytest.mark.parametrize("model", ["sd3-no-t5", "sd3-drop", "sdxl"])
async def test_generate_fp(served: tuple[httpx.AsyncClient, Path], model: str) -> None:
    client, _ = served
    r = await client.post("/generate", json={"prompt": "a red circle", "model": model, "seed": 1})
    assert r.status_code == 200, r.text
    assert decode_image(r.json()["images"][0]["b64_json"]).size == (64, 64)


async def test_generate_quantized_variant_built_at_serving_conditions(served: tuple[httpx.AsyncClient, Path]) -> None:
    client, cache = served
    r = await client.post(
        "/generate",
        json={"prompt": "a cat", "model": "sd3-no-t5", "variant": "int8", "seed": 3, "width": 32, "height": 48},
    )
    assert r.status_code == 200, r.text
    assert r.json()["variant"] == "int8"
    assert decode_image(r.json()["images"][0]["b64_json"]).size == (32, 48)
    cal = json.loads((cache / "sd3-no-t5" / "int8" / "manifest.json").read_text())["calibration"]
    assert (cal["height"], cal["width"], cal["guidance_scale"], cal["num_inference_steps"]) == (64, 64, 2.5, 2)


async def test_flux_sizes_are_exact_or_refused(served: tuple[httpx.AsyncClient, Path]) -> None:
    client, _ = served
    r = await client.post("/generate", json={"prompt": "a cat", "model": "flux", "width": 520, "height": 512})
    assert r.status_code == 422
    assert "width" in r.text and "multiple of 16" in r.text
    for size in (512, 1024):
        r = await client.post(
            "/generate",
            json={
                "prompt": "a cat",
                "model": "flux",
                "width": size,
                "height": size,
                "num_inference_steps": 1,
                "seed": 0,
            },
        )
        assert r.status_code == 200, r.text
        assert decode_image(r.json()["images"][0]["b64_json"]).size == (size, size)
