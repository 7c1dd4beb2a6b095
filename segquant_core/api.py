"""The public surface of the engine: detect, quantize, save, load, recipes — and pipeline helpers.

Everything a caller (the CLI, the service worker, a notebook) needs is importable from
``segquant_core`` directly; the submodules are implementation.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from segquant_core.artifacts import ArtifactError, load, read_manifest, save
from segquant_core.calibrate.capture import CalibrationSet, capture_calibration, denoiser_of
from segquant_core.checkpoint_load import load_denoiser, replace_denoiser, resident_bytes
from segquant_core.checkpoint_status import (
    CheckpointStatus,
    calibration_settings,
    checkpoint_is_current,
    checkpoint_status,
    weights_sha256,
)
from segquant_core.compile import CompileResult, compile_default, compile_denoiser, resolve_compile, use_cache_dir
from segquant_core.detect.plan import LayerPlan, Plan, Segments
from segquant_core.quantize import ProgressFn, QuantizationResult, quantize
from segquant_core.recipes import Recipe, recipe, recipe_names


def detect(model: nn.Module, example_kwargs: dict[str, Any] | None = None, **kwargs: Any) -> Plan:
    """Find SegLinear / DualScale candidates in ``model`` from one real forward pass (see :mod:`.detect`)."""
    from segquant_core.detect import detect as _detect

    return _detect(model, example_kwargs, **kwargs)


def quantize_pipeline(
    pipe: Any,
    recipe_spec: str | Recipe,
    prompts: Sequence[str],
    *,
    num_inference_steps: int = 20,
    steps_per_prompt: int = 4,
    guidance_scale: float | None = None,
    seed: int = 0,
    plan: Plan | None = None,
    backend: str = "auto",
    progress: bool = True,
    call_kwargs: dict[str, Any] | None = None,
    calibration: CalibrationSet | None = None,
    on_progress: ProgressFn | None = None,
    compile: str | bool = "off",
) -> QuantizationResult:
    """Calibrate on ``pipe``'s own denoising loop over ``prompts`` and quantize its denoiser in place.

    ``calibration`` reuses denoiser inputs captured earlier (:func:`capture_calibration` on the same float
    pipeline and prompts), e.g. when several recipes are built from one model; ``prompts`` are then unused.
    ``on_progress(phase, done, total)`` reports ``capture`` (prompts), then the phases of :func:`quantize`.
    ``compile`` (``on``/``off``/``auto`` or a bool; default off: compiling costs a minute or more, paid on the
    next call) wraps the quantized denoiser in ``torch.compile`` (:func:`compile_denoiser`); ``auto`` follows
    :func:`compile_default` for the denoiser's device.
    """
    r = recipe(recipe_spec) if isinstance(recipe_spec, str) else recipe_spec
    model = denoiser_of(pipe)
    calib = calibration if calibration is not None else CalibrationSet()
    if r.quantizes and calibration is None:
        calib = capture_calibration(
            pipe,
            prompts,
            num_inference_steps=num_inference_steps,
            steps_per_prompt=steps_per_prompt,
            guidance_scale=guidance_scale,
            seed=seed,
            call_kwargs=call_kwargs,
            progress=progress,
            on_progress=on_progress,
        )
    result = quantize(model, r, calib, plan, backend=backend, seed=seed, progress=progress, on_progress=on_progress)
    if resolve_compile(compile, default=compile_default(_device_of(model))):
        compile_denoiser(model)
    return result


def _device_of(model: nn.Module) -> str:
    first = next(iter(model.parameters()), None)
    if first is None:  # not `or`: a tensor's truth value is ambiguous
        first = next(iter(model.buffers()), None)
    return first.device.type if first is not None else "cpu"


def load_into_pipeline(directory: str | Path, pipe: Any, *, backend: str = "auto") -> QuantizationResult:
    """Load an artifact into ``pipe``'s denoiser."""
    return load(directory, denoiser_of(pipe), backend=backend)


__all__ = [
    "ArtifactError",
    "CalibrationSet",
    "CheckpointStatus",
    "CompileResult",
    "LayerPlan",
    "Plan",
    "QuantizationResult",
    "Recipe",
    "Segments",
    "calibration_settings",
    "capture_calibration",
    "checkpoint_is_current",
    "checkpoint_status",
    "compile_default",
    "compile_denoiser",
    "denoiser_of",
    "detect",
    "load",
    "load_denoiser",
    "load_into_pipeline",
    "quantize",
    "quantize_pipeline",
    "read_manifest",
    "recipe",
    "recipe_names",
    "replace_denoiser",
    "resident_bytes",
    "resolve_compile",
    "save",
    "use_cache_dir",
    "weights_sha256",
]
