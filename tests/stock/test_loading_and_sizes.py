"""Loading stock pipeline folders (null components, drop_components, safetensors only) and size rules that
match what each pipeline really renders."""

from __future__ import annotations

import logging
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from service.pipeline_folder import active_components, read_model_index
from service.registry import ModelSpec, derive_size_rule
from service.worker.sources import calibration_prompts, load_source
from tests.stock.conftest import KINDS


def test_sd3_saved_without_t5_loads_in_the_cli_and_the_service(stock_dirs: dict[str, Path]) -> None:
    from segquant_cli.models import load_pipeline

    for pipe in (
        load_pipeline(stock_dirs["sd3-no-t5"]),
        load_source(str(stock_dirs["sd3-no-t5"]), torch.float32, "cpu"),
    ):
        assert type(pipe).__name__ == "StableDiffusion3Pipeline"
        assert pipe.text_encoder_3 is None and pipe.tokenizer_3 is None and pipe.transformer is not None


def test_drop_components_takes_the_tokenizer_too(stock_dirs: dict[str, Path]) -> None:
    pipe = load_source(str(stock_dirs["sd3"]), torch.float32, "cpu", ["text_encoder_3"])
    assert pipe.text_encoder_3 is None and pipe.tokenizer_3 is None and pipe.text_encoder_2 is not None
    index = read_model_index(stock_dirs["sd3"])
    assert "text_encoder_3" in active_components(index)
    assert not {"text_encoder_3", "tokenizer_3"} & set(active_components(index, ["text_encoder_3"]))
    image = pipe("a cat", num_inference_steps=1, height=32, width=32, output_type="pil").images[0]
    assert image.size == (32, 32)


@pytest.mark.parametrize(
    ("drop", "reason"), [(["text_encoder_9"], "is not a component"), (["transformer"], "cannot be dropped")]
)
def test_registry_refuses_bad_drop_components(stock_dirs: dict[str, Path], drop: list[str], reason: str) -> None:
    with pytest.raises(ValueError, match=reason) as err:
        ModelSpec.model_validate(
            {"name": "m", "source": str(stock_dirs["sd3"]), "drop_components": drop, "variants": ["fp"]}
        )
    assert "drop_components" in str(err.value) and drop[0] in str(err.value)


def test_pickle_weights_are_never_loaded(stock_dirs: dict[str, Path], tmp_path: Path) -> None:
    """use_safetensors=True: a folder whose VAE has only a pickle (.bin) file is refused, not unpickled
    (diffusers would otherwise fall back to the .bin, a valid state dict here)."""
    from safetensors.torch import load_file

    folder = tmp_path / "pickled"
    shutil.copytree(stock_dirs["sd3-no-t5"], folder)
    weights = folder / "vae" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(weights), folder / "vae" / "diffusion_pytorch_model.bin")  # the pickle a user might have
    weights.unlink()
    with pytest.raises(OSError, match="safetensors"):
        load_source(str(folder), torch.float32, "cpu")


def test_loading_raises_no_deprecation_warning(stock_dirs: dict[str, Path]) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_source(str(stock_dirs["flux"]), torch.bfloat16, "cpu")
    assert not [w for w in caught if "torch_dtype" in str(w.message)]


@pytest.mark.parametrize("kind", KINDS)
def test_size_rule_matches_what_the_pipeline_renders(kind: str, stock_dirs: dict[str, Path]) -> None:
    rule = derive_size_rule(str(stock_dirs[kind]))
    pipe = load_source(str(stock_dirs[kind]), torch.float32, "cpu")
    latent_step = {"flux": 2 * pipe.vae_scale_factor}.get(kind, pipe.vae_scale_factor)
    assert rule.multiple_of % latent_step == 0 and rule.multiple_of >= latent_step
    assert rule.problem(rule.default) is None and rule.problem(rule.multiple_of * 3) is None
    extra = {"use_resolution_binning": False} if kind == "pixart-sigma" else {}
    width, height = rule.multiple_of * 3, rule.multiple_of * 2
    image = pipe("a cat", num_inference_steps=1, height=height, width=width, **extra).images[0]
    assert image.size == (width, height)  # the rule never admits a size the pipeline would resize
    assert "multiple of" in (rule.problem(rule.multiple_of * 3 + 1) or "")


def test_size_rules_read_the_configs(stock_dirs: dict[str, Path]) -> None:
    """Flux: 8× VAE × 2×2 packing = 16, default 128 latent cells; SD3's position table bounds its max."""
    rule = derive_size_rule(str(stock_dirs["flux"]))
    assert (rule.multiple_of, rule.default, rule.max) == (16, 1024, 2048)
    assert "multiple of 16" in (rule.problem(520) or "") and rule.problem(512) is None
    sd3 = derive_size_rule(str(stock_dirs["sd3"]))
    assert (sd3.multiple_of, sd3.default, sd3.max) == (4, 64, 128)  # 2× VAE × patch 2; 32-cell position table


def test_partial_sizes_keep_the_derived_step(stock_dirs: dict[str, Path]) -> None:
    spec = ModelSpec.model_validate(
        {"name": "f", "source": str(stock_dirs["flux"]), "sizes": {"default": 256}, "variants": ["fp", "w8a8-segquant"]}
    )
    assert (spec.size_rule.multiple_of, spec.size_rule.default) == (16, 256)
    cal = spec.variant("w8a8-segquant").calibration
    assert cal.call_kwargs == {"height": 256, "width": 256} and cal.guidance_scale == spec.defaults.guidance_scale


def test_stock_models_calibrate_on_the_general_set_never_the_shapes_prompts(
    stock_dirs: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    import segquant_shapes
    from segquant_core.prompts import general_calibration_prompts

    pipe = load_source(str(stock_dirs["sdxl"]), torch.float32, "cpu")
    with caplog.at_level(logging.INFO, logger="service.worker.sources"):
        prompts = calibration_prompts(str(stock_dirs["sdxl"]), pipe, 300, None)
    assert len(prompts) == 300 and prompts[:256] == general_calibration_prompts()
    assert not set(prompts) & set(segquant_shapes.calibration_prompts(64))
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "general-purpose calibration set" in lines[0] and "cycled" in lines[0]
