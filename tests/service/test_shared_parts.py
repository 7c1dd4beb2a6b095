"""Shared pipeline parts, eviction before load, latent-aware memory estimates, builds with fidelity (engine level).

A tiny random *stock* SD3 pipeline (two CLIP encoders, T5, VAE) saved to a folder is the model, so the text
encoders are real separate modules whose identity can be checked.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from segquant_core.bench.real_configs import SD35_MEDIUM
from service.registry import Registry, VariantKey
from service.worker import memory
from service.worker.build_progress import BuildTracker
from service.worker.engine import ArtifactMissingError, Engine, Sample
from tests.service.helpers import make_settings
from tests.stock.builders import save_stock_pipeline

CALIBRATION = {"samples": 2, "num_inference_steps": 2, "steps_per_prompt": 1}


@pytest.fixture(scope="module")
def sd3_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_stock_pipeline("sd3", tmp_path_factory.mktemp("sd3") / "pipe")


def _engine(tmp_path: Path, folder: Path, **worker: object) -> Engine:
    models = [
        {
            "name": "sd3",
            "source": str(folder),
            "defaults": {"num_inference_steps": 4, "guidance_scale": 2.0},
            "eval": {"prompts": 2},
            "variants": [
                "fp",
                {"name": "w8a8", "recipe": "w8a8-segquant", "calibration": CALIBRATION},
                {"name": "fp-again", "recipe": "fp"},
            ],
        }
    ]
    settings = make_settings(tmp_path, models=models, worker=dict(worker))
    return Engine(Registry.from_settings(settings), settings)


def test_the_sd35_medium_estimate_at_1024_is_gigabytes_not_terabytes() -> None:
    latent = memory.estimate_call_bytes(
        SD35_MEDIUM,
        images=1,
        height=1024,
        width=1024,
        guidance=True,
        dtype_bytes=2,
        pixel_space=False,
        vae_scale_factor=8,
    )
    pixel = memory.estimate_call_bytes(SD35_MEDIUM, images=1, height=1024, width=1024, guidance=True, dtype_bytes=2)
    # 4096 image + 333 text tokens × 1536 × 16 + 24 heads × 4429² scores, two CFG rows, bf16: ≈ 2.3 GB
    assert 1 * 2**30 < latent < 4 * 2**30
    assert pixel > 1000 * latent  # what the estimate said when it treated SD3.5 as pixel space
    flux_like = {"patch_size": 1, "num_attention_heads": 24, "attention_head_dim": 128, "joint_attention_dim": 4096}
    packed = memory.estimate_call_bytes(
        flux_like,
        images=1,
        height=1024,
        width=1024,
        guidance=False,
        dtype_bytes=2,
        pixel_space=False,
        vae_scale_factor=8,
        latent_packing=2,
        text_tokens=512,
    )
    tokens = 64 * 64 + 512  # 2×2-packed 128² latents
    assert packed == 2 * (tokens * 3072 * 16 + 24 * tokens * tokens)


def test_variants_share_text_encoders_and_get_their_own_scheduler(tmp_path: Path, sd3_folder: Path) -> None:
    engine = _engine(tmp_path, sd3_folder)
    fp = engine.load(VariantKey("sd3", "fp"))
    again = engine.load(VariantKey("sd3", "fp-again"))
    assert fp.denoiser is not again.denoiser
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3", "vae", "tokenizer"):
        assert fp.parts.components[name] is again.parts.components[name], name
    one, two = fp.pipeline(), again.pipeline()
    assert one.text_encoder_3 is two.text_encoder_3 and one.transformer is fp.denoiser
    assert one.scheduler is not two.scheduler and one.scheduler is not fp.pipeline().scheduler
    status = engine.status(VariantKey("sd3", "fp"))
    shared = sum(
        p.numel() * p.element_size()
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3", "vae")
        for p in [*fp.parts.components[name].parameters(), *fp.parts.components[name].buffers()]
    )
    assert status.state == "loaded" and status.shared_bytes == shared
    # the estimate runs in latent space (the tiny VAE downsamples 2×), in the engine's reference precision
    # (bf16 on CPUs with native bf16, fp32 elsewhere)
    est = engine.estimate_call_bytes(fp, images=1, height=32, width=32, guidance=True)
    cfg = dict(fp.denoiser.config)
    dtype_bytes = engine.dtype.itemsize
    assert est == memory.estimate_call_bytes(
        cfg,
        images=1,
        height=32,
        width=32,
        guidance=True,
        dtype_bytes=dtype_bytes,
        pixel_space=False,
        vae_scale_factor=2,
    )


def test_a_quantized_variant_is_never_built_by_load_and_shares_parts_once_built(
    tmp_path: Path, sd3_folder: Path
) -> None:
    engine = _engine(tmp_path, sd3_folder)
    key = VariantKey("sd3", "w8a8")
    with pytest.raises(ArtifactMissingError, match="built in the background"):
        engine.load(key)
    fp = engine.load(VariantKey("sd3", "fp"))
    tracker = BuildTracker(key)
    outcome = engine.build(key, tracker)
    assert outcome.built_here and (engine.artifact_dir(key) / "manifest.json").is_file()
    assert engine.status(key).state == "available" and engine.status(key).progress is None
    report = json.loads((engine.artifact_dir(key) / "eval.json").read_text())
    entry = report["variants"][0]
    assert entry["variant"] == "w8a8-segquant" and report["eval_prompt_count"] == 2 and report["seeds"] == [0]
    assert report["num_inference_steps"] == 4 and entry["ssim"] > 0 and entry["latent_mse"] >= 0
    assert tracker.snapshot().phase == "evaluating"
    q = engine.load(key)
    assert q.parts is fp.parts and q.parts.components["text_encoder"] is fp.parts.components["text_encoder"]
    images, _ = engine.generate(
        q,
        [Sample("a red circle", None, [1])],
        width=32,
        height=32,
        steps=2,
        guidance_scale=2.0,
        on_step=lambda s, t: None,
    )
    assert images[0][0].size == (32, 32)
    # a second build finds the artifact (and its eval.json) and does nothing
    again = engine.build(key, BuildTracker(key))
    assert not again.built_here and again.fidelity is None


def test_eviction_happens_before_the_new_variant_loads(
    tmp_path: Path, sd3_folder: Path, caplog: pytest.LogCaptureFixture
) -> None:
    engine = _engine(tmp_path, sd3_folder, max_loaded_variants=1)
    caplog.set_level(logging.INFO, logger="service.worker.engine")
    engine.load(VariantKey("sd3", "fp"))
    caplog.clear()
    engine.load(VariantKey("sd3", "fp-again"))
    lines = [r.getMessage() for r in caplog.records]
    unloaded = next(i for i, m in enumerate(lines) if m.startswith("unloaded sd3:fp before loading sd3:fp-again"))
    loading = next(i for i, m in enumerate(lines) if m.startswith("loading sd3:fp-again"))
    assert unloaded < loading
    assert engine.loaded_keys() == [VariantKey("sd3", "fp-again")]
    assert engine.status(VariantKey("sd3", "fp")).state == "available"


def test_the_memory_budget_evicts_before_load(
    tmp_path: Path, sd3_folder: Path, caplog: pytest.LogCaptureFixture
) -> None:
    probe = _engine(tmp_path / "probe", sd3_folder)
    lv = probe.load(VariantKey("sd3", "fp"))
    one = lv.weight_bytes + lv.parts.shared_bytes
    engine = _engine(tmp_path, sd3_folder, memory_budget_bytes=one + lv.weight_bytes // 2)
    caplog.set_level(logging.INFO, logger="service.worker.engine")
    engine.load(VariantKey("sd3", "fp"))
    engine.load(VariantKey("sd3", "fp-again"))  # expected: as large as the loaded fp denoiser, so fp goes first
    engine.load(VariantKey("sd3", "fp"))
    assert "memory budget" in caplog.text
    assert len(engine.loaded_keys()) == 1
    torch.testing.assert_close(  # the same source weights whichever copy serves
        dict(engine.load(VariantKey("sd3", "fp")).denoiser.state_dict())["proj_out.weight"],
        dict(lv.denoiser.state_dict())["proj_out.weight"],
    )
