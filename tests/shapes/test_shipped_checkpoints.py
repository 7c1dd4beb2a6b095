"""The shipped quantized checkpoints are what today's engine builds, load without the float denoiser, and
are what the embedded default serves. Rebuild them with ``python -m segquant_cli.shipped_checkpoints``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import segquant_core as sq
import segquant_shapes
from segquant_cli import shipped_checkpoints as shipped
from segquant_core.witness import witness_matches
from service.registry import Registry

CASES = [(m, r) for m in shipped.MODELS for r in shipped.RECIPES]
REBUILD = "rebuild with: python -m segquant_cli.shipped_checkpoints"


@pytest.mark.parametrize("model,recipe", CASES)
def test_shipped_checkpoint_is_current(model, recipe):
    status = shipped.status(model, recipe)
    assert status, f"{model}/{recipe}: {status.reason}; {REBUILD}"


@pytest.mark.parametrize("model,recipe", CASES)
def test_shipped_checkpoint_was_built_with_todays_detection(model, recipe):
    """The staleness check above does not run detection (a worker would need the float model and a forward pass
    for it); here the checkpoint's recorded plan must equal the golden plan, which tests/detect checks against
    today's detection, so a detection-only change cannot leave the shipped checkpoints behind unnoticed."""
    golden = Path(__file__).parents[1] / "detect" / "golden" / f"shipped_{model}.json"
    manifest = json.loads((shipped.checkpoint_dir(model, recipe) / "manifest.json").read_text())
    assert manifest["plan"] == json.loads(golden.read_text()), f"{model}/{recipe}: built with another plan; {REBUILD}"


def test_check_command_takes_one_model_and_recipe(capsys):
    assert shipped.main(["--check", "--model", "flux", "--recipe", "w8a8-segquant"]) == 0
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("model,recipe", CASES)
def test_witness_layer_rebuilds_bit_identically(model, recipe):
    torch.set_num_threads(1)
    d = shipped.checkpoint_dir(model, recipe)
    pipe = segquant_shapes.load_shipped(model)
    linear = sq.denoiser_of(pipe).get_submodule(shipped.WITNESS_LAYERS[model])
    ok, why = witness_matches(d, linear)
    assert ok, f"{model}/{recipe}: {why}; the engine's numerics changed: bump ENGINE_NUMERICS and {REBUILD}"


@pytest.mark.parametrize("model,recipe", CASES)
def test_shipped_checkpoint_is_small_and_generates(model, recipe):
    d = shipped.checkpoint_dir(model, recipe)
    assert sum(f.stat().st_size for f in d.iterdir()) < 12e6
    pipe = segquant_shapes.load_shipped(model)
    sq.replace_denoiser(pipe, sq.load_denoiser(d))
    with torch.no_grad():
        image = pipe(
            ["a red circle"], num_inference_steps=2, output_type="pt", generator=[torch.Generator().manual_seed(0)]
        ).images
    assert image.shape[-1] == 32 and torch.isfinite(image).all()


def test_embedded_default_serves_the_shipped_checkpoints():
    registry = Registry.default()
    assert registry.default_model.name == "shapes-mmdit"
    for model in shipped.MODELS:
        spec = registry.model(f"shapes-{model}")
        assert spec.source == f"shipped:{model}" and [v.name for v in spec.variants] == ["fp", *shipped.RECIPES]
        for recipe in shipped.RECIPES:
            assert spec.variant(recipe).artifact == shipped.checkpoint_dir(model, recipe)


@pytest.mark.parametrize("model,recipe", CASES)
def test_shipped_checkpoint_carries_its_fidelity(model, recipe):
    """eval.json (written by ``--eval``) is the worker's post-build report: held-out prompts against fp."""
    data = json.loads((shipped.checkpoint_dir(model, recipe) / "eval.json").read_text())
    (entry,) = data["variants"]
    assert entry["variant"] == recipe and 25 < entry["psnr"] < 80 and 0.5 < entry["ssim"] <= 1
    cal = shipped.calibration_prompts(shipped.calibration_spec(model, recipe))
    assert data["eval_prompts"] and not set(data["eval_prompts"]) & set(cal)
    assert set(entry["adherence"]) >= {"background", "color", "position", "shape"}


def test_models_shows_fidelity_of_the_shipped_variants_without_a_build(tmp_path):
    """GET /models on the embedded default: every shipped model's quantized variants show their PSNR with
    nothing built, and a Flux-style job runs on its shipped checkpoint (loaded on demand, not built)."""
    from fastapi.testclient import TestClient

    from service.api.app import create_app
    from service.settings import load_settings

    settings = load_settings(None, cache_dir=str(tmp_path / "cache"), worker={"preload": [], "warmup": False})
    with TestClient(create_app(settings)) as client:
        body = client.get("/models").json()
        variants = {(m["name"], v["name"]): v for m in body["data"] for v in m["variants"]}
        for model in shipped.MODELS:
            for recipe in shipped.RECIPES:
                entry = variants[(f"shapes-{model}", recipe)]
                fidelity = entry["fidelity"]
                assert entry["state"] == "available", entry
                assert fidelity is not None and fidelity["psnr"] > 25, entry
                assert fidelity["eval_prompt_count"] == 8 and fidelity["seeds"] == [0]
        request = {
            "prompt": "a red circle",
            "model": "shapes-flux",
            "variant": "w8a8-segquant",
            "num_inference_steps": 2,
            "seed": 0,
        }
        r = client.post("/generate", json=request)
        assert r.status_code == 200, r.text
        assert (r.json()["model"], r.json()["variant"]) == ("shapes-flux", "w8a8-segquant")
        states = {
            (m["name"], v["name"]): v["state"] for m in client.get("/models").json()["data"] for v in m["variants"]
        }
    assert states[("shapes-flux", "w8a8-segquant")] == "loaded" and states[("shapes-mmdit", "fp")] != "loaded"
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("manifest.json"))


def test_loading_a_checkpoint_writes_nothing_next_to_it(tmp_path):
    """An ``artifact:`` folder may be read-only (a shipped checkpoint in an installed package): the worker's
    lock lives in its cache folder, never beside the checkpoint."""
    import shutil

    from service.registry import VariantKey
    from service.settings import load_settings
    from service.worker.engine import Engine

    shelf = tmp_path / "shelf"
    shutil.copytree(shipped.checkpoint_dir("mmdit", "w8a8-segquant"), shelf / "w8a8-segquant")
    before = sorted(p.relative_to(shelf) for p in shelf.rglob("*"))
    models = [
        {
            "name": "m",
            "source": "shipped:mmdit",
            "variants": ["fp", {"name": "q", "recipe": "w8a8-segquant", "artifact": str(shelf / "w8a8-segquant")}],
        }
    ]
    settings = load_settings(None, models=models, cache_dir=str(tmp_path / "cache"))
    engine = Engine(Registry.from_settings(settings), settings)
    engine.load(VariantKey("m", "q"))
    assert sorted(p.relative_to(shelf) for p in shelf.rglob("*")) == before
    assert list((tmp_path / "cache" / "locks").glob("w8a8-segquant-*.lock"))
