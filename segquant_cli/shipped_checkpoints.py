"""Build the shipped quantized checkpoints: ``python -m segquant_cli.shipped_checkpoints [--model M] [--check]``.

Every shipped model (``segquant_shapes/weights/<model>``: mmdit, unet, flux) gets ``variants/<recipe>/`` for
each recipe below, built with exactly the calibration the service uses by default for a missing artifact
(the registry's ``CalibrationSpec`` at serving conditions, so the worker's staleness check accepts them):
64 calibration prompts × 4 of 20 steps (256 samples) at the default size and guidance, seed 0. One
calibration capture per model serves both recipes. Each checkpoint also stores a witness
(:mod:`segquant_core.witness`) for the fast "still current" test. The recorded calibration is kept under
``--calibration-cache`` and reused while the float weights and the calibration settings are unchanged, so a
rebuild after an engine change skips the pipeline runs (:mod:`segquant_cli.calibration_cache`).
``--check`` builds nothing and exits 1 if a checkpoint is missing or stale. After building, and with
``--eval`` alone for existing checkpoints, each checkpoint gets the ``eval.json`` a worker writes after a
build (the registry's default ``eval`` section: held-out prompts against ``fp``), so ``GET /models`` shows
the fidelity of the shipped variants without anything being built.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
from pathlib import Path
from typing import Any

MODELS = ("mmdit", "unet", "flux")
RECIPES = ("w8a8-segquant", "w4a8-segquant")
# A layer whose input is a raw model input (a sinusoidal timestep embedding), so its statistics do not
# depend on how other layers were quantized.
WITNESS_LAYERS = {
    "mmdit": "time_text_embed.timestep_embedder.linear_1",
    "unet": "time_embedding.linear_1",
    "flux": "time_text_embed.timestep_embedder.linear_1",
}
DEFAULT_CALIBRATION_CACHE = Path("~/.cache/segquant-serve/shipped-calibration")
# The folder of each model's float denoiser weights (the checkpoint records their hash).
DENOISER_FOLDERS = {"mmdit": "transformer", "unet": "unet", "flux": "transformer"}


def variants_dir(model: str) -> Path:
    import segquant_shapes

    return segquant_shapes.shipped_pipeline_path(model) / "variants"


def checkpoint_dir(model: str, recipe: str) -> Path:
    return variants_dir(model) / recipe


def source_weights_dir(model: str) -> Path:
    import segquant_shapes

    return segquant_shapes.shipped_pipeline_path(model) / DENOISER_FOLDERS[model]


def model_spec(model: str, recipe: str) -> Any:
    """The service's registry entry for this shipped model with one variant (all defaults)."""
    from service.registry import ModelSpec

    return ModelSpec.model_validate({"name": f"shapes-{model}", "source": f"shipped:{model}", "variants": [recipe]})


def calibration_spec(model: str, recipe: str) -> Any:
    """The service's calibration for this shipped model's variant (registry defaults, serving conditions)."""
    return model_spec(model, recipe).variant(recipe).calibration


def calibration_prompts(cal: Any) -> list[str]:
    import segquant_shapes

    return segquant_shapes.calibration_prompts(math.ceil(cal.samples / cal.steps_per_prompt))


def expected_calibration(model: str, recipe: str) -> dict[str, Any]:
    import segquant_core as sq

    cal = calibration_spec(model, recipe)
    return sq.calibration_settings(
        calibration_prompts(cal),
        num_inference_steps=cal.num_inference_steps,
        steps_per_prompt=cal.steps_per_prompt,
        guidance_scale=cal.guidance_scale,
        seed=cal.seed,
    )


def status(model: str, recipe: str) -> Any:
    """``sq.CheckpointStatus`` of one shipped checkpoint against today's engine and settings."""
    import segquant_core as sq

    return sq.checkpoint_status(
        checkpoint_dir(model, recipe),
        recipe,
        calibration=expected_calibration(model, recipe),
        source_sha256=sq.weights_sha256(source_weights_dir(model)),
    )


def evaluate(model: str, recipe: str) -> dict[str, Any]:
    """Write ``eval.json`` next to one shipped checkpoint, exactly as a worker does after a build."""
    import segquant_shapes
    from service.worker.fidelity import eval_prompts, evaluate_artifact

    spec = model_spec(model, recipe)
    ev, cal = spec.eval, spec.variant(recipe).calibration
    steps = ev.num_inference_steps or spec.defaults.num_inference_steps

    def load_float_pipeline() -> Any:
        pipe = segquant_shapes.load_shipped(model)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    probe = load_float_pipeline()
    calibration = calibration_prompts(cal)
    prompts = [p for p in eval_prompts(probe, ev.prompts, ev.prompts_file) if p not in set(calibration)]
    size = spec.size_rule.default
    data = evaluate_artifact(
        load_float_pipeline,
        checkpoint_dir(model, recipe),
        recipe,
        prompts=prompts,
        calibration_prompts=calibration,
        seeds=ev.seeds,
        num_inference_steps=steps,
        guidance_scale=spec.defaults.guidance_scale,
        scorer=getattr(probe, "adherence_scorer", None),
        call_kwargs={"height": size, "width": size},
    )
    data["artifact"] = f"shipped:{model}/variants/{recipe}"  # not this machine's path
    from service.worker.fidelity import write_json

    write_json(checkpoint_dir(model, recipe) / "eval.json", data)
    entry = next(iter(data["variants"]), {})
    print(
        f"{model}/{recipe}: PSNR {entry.get('psnr')} dB, SSIM {entry.get('ssim')} on {len(prompts)} prompts", flush=True
    )
    return data


def recorded_calibration(
    model: str, recipe: str, pipe: Any, cache: Path | None, progress: bool, reuse: bool = True
) -> Any:
    """The denoiser calls the service's calibration records, read from ``cache`` when the float weights and the
    calibration settings are the ones it was recorded with (an engine change alone needs no new capture)."""
    import segquant_core as sq
    from segquant_cli.calibration_cache import calibration_key, load_calibration, save_calibration

    cal = calibration_spec(model, recipe)
    key = calibration_key(
        {"calibration": expected_calibration(model, recipe), "spec": cal.model_dump(mode="json")},
        sq.weights_sha256(source_weights_dir(model)),
    )
    path = cache / f"{model}-{key[:16]}.safetensors" if cache is not None else None
    if path is not None and reuse and (stored := load_calibration(path, key)) is not None:
        print(f"{model}: calibration read from {path} ({len(stored)} calls)", flush=True)
        return stored
    calib = sq.capture_calibration(
        pipe,
        calibration_prompts(cal),
        num_inference_steps=cal.num_inference_steps,
        steps_per_prompt=cal.steps_per_prompt,
        guidance_scale=cal.guidance_scale,
        seed=cal.seed,
        call_kwargs=cal.call_kwargs,
        progress=progress,
    )
    if path is not None:
        save_calibration(calib, path, key)
    return calib


def build(
    model: str,
    recipes: tuple[str, ...] = RECIPES,
    progress: bool = True,
    calibration_cache: Path | None = None,
    reuse_calibration: bool = True,
) -> list[Path]:
    """Calibrate the shipped ``model`` once and write one checkpoint per recipe."""
    import segquant_core as sq
    import segquant_shapes
    from segquant_core.witness import observe_layer, write_witness

    cal = calibration_spec(model, recipes[0])
    if any(calibration_spec(model, r) != cal for r in recipes):
        raise RuntimeError("the recipes of one model are calibrated alike by the service")
    pipe = segquant_shapes.load_shipped(model)
    pipe.set_progress_bar_config(disable=True)
    calib = recorded_calibration(model, recipes[0], pipe, calibration_cache, progress, reuse_calibration)
    float_denoiser = sq.denoiser_of(pipe)
    source = {"model": f"shipped:{model}", "weights_sha256": sq.weights_sha256(source_weights_dir(model))}
    out = []
    for recipe in recipes:
        denoiser = copy.deepcopy(float_denoiser)
        result = sq.quantize(denoiser, recipe, calib, seed=cal.seed, progress=progress)
        target = sq.save(denoiser, checkpoint_dir(model, recipe), source=source)
        witness = WITNESS_LAYERS[model]
        spec = result.recipe.resolve(witness, result.plan.get(witness) or sq.LayerPlan(witness))
        if spec is None or witness not in result.layers:
            raise RuntimeError(f"witness layer {witness!r} of {model} is not quantized by {recipe}")
        stats = observe_layer(float_denoiser, witness, calib.calls, spec.gptq, spec.segments, seed=cal.seed)
        write_witness(target, witness, stats)
        out.append(target)
        print(f"wrote {target} ({sum(f.stat().st_size for f in target.iterdir()) / 1e6:.1f} MB)", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m segquant_cli.shipped_checkpoints", description=__doc__)
    parser.add_argument("--model", choices=MODELS, action="append", help="only this model (repeatable)")
    parser.add_argument("--recipe", choices=RECIPES, action="append", help="only this recipe (repeatable)")
    parser.add_argument("--check", action="store_true", help="build nothing; exit 1 if any checkpoint is stale")
    parser.add_argument("--eval", action="store_true", help="build nothing; (re)write eval.json of each checkpoint")
    parser.add_argument(
        "--calibration-cache",
        type=Path,
        default=DEFAULT_CALIBRATION_CACHE,
        help="recorded calibrations are kept here and reused while weights and settings match (default: %(default)s)",
    )
    parser.add_argument("--fresh-calibration", action="store_true", help="record the calibration again (and keep it)")
    args = parser.parse_args(argv)
    cache = args.calibration_cache.expanduser()
    models = tuple(args.model or MODELS)
    recipes = tuple(args.recipe or RECIPES)
    if args.check:
        stale = [(m, r, s.reason) for m in models for r in recipes if not (s := status(m, r))]
        for m, r, reason in stale:
            print(f"{m}/{r}: stale: {reason}")
        return 1 if stale else 0
    if args.eval:
        for m in models:
            for r in recipes:
                evaluate(m, r)
        return 0
    for m in models:
        build(m, recipes, calibration_cache=cache, reuse_calibration=not args.fresh_calibration)
        for r in recipes:
            evaluate(m, r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
