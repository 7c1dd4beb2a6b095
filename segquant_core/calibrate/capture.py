"""Collect denoiser calls from a pipeline's own denoising loop, to calibrate on real inputs.

A forward pre-hook on the pipeline's denoiser (``transformer`` or ``unet``) records the inputs of a seeded
random subset of the denoising steps of every prompt (positional arguments are stored under their
parameter names). The pipeline itself is untouched: no vendored loop, so any diffusers pipeline works.
"""

from __future__ import annotations

import inspect
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm


@dataclass
class CalibrationSet:
    """Recorded denoiser calls (CPU tensors) plus how they were obtained (for the artifact manifest)."""

    calls: list[dict[str, Any]] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)
    steps: list[list[int]] = field(default_factory=list)  # recorded step indices per prompt
    num_inference_steps: int = 0
    guidance_scale: float | None = None
    seed: int = 0
    height: int | None = None  # the image size calibrated at (None: the pipeline's default)
    width: int | None = None

    def __len__(self) -> int:
        return len(self.calls)

    def describe(self) -> dict[str, Any]:
        import hashlib

        digest = hashlib.sha256("\n".join(self.prompts).encode()).hexdigest()
        return {
            "samples": len(self.calls),
            "prompts": len(self.prompts),
            "prompts_sha256": digest,
            "num_inference_steps": self.num_inference_steps,
            "steps_per_prompt": [len(s) for s in self.steps][:1] or [0],
            "recorded_steps": self.steps,
            "guidance_scale": self.guidance_scale,
            "height": self.height,
            "width": self.width,
            "seed": self.seed,
        }


def denoiser_of(pipe: Any) -> nn.Module:
    for attr in ("transformer", "unet"):
        module = getattr(pipe, attr, None)
        if isinstance(module, nn.Module):
            return module
    raise ValueError(f"{type(pipe).__name__} has no 'transformer' or 'unet' component to quantize")


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value


def capture_calibration(
    pipe: Any,
    prompts: Sequence[str],
    *,
    num_inference_steps: int = 20,
    steps_per_prompt: int = 4,
    guidance_scale: float | None = None,
    seed: int = 0,
    call_kwargs: dict[str, Any] | None = None,
    progress: bool = True,
    on_progress: Callable[[str, int, int], None] | None = None,
) -> CalibrationSet:
    """Run ``pipe`` on each prompt and keep the denoiser inputs of ``steps_per_prompt`` random steps.

    The step subset is drawn from ``random.Random(seed)`` per prompt, so the same arguments always
    record the same calls. ``call_kwargs`` go to the pipeline (e.g. height/width). ``on_progress`` is
    called as ``("capture", prompts done, prompts)``.
    """
    if not prompts:
        raise ValueError("calibration needs at least one prompt")
    if not 1 <= steps_per_prompt <= num_inference_steps:
        raise ValueError(f"steps_per_prompt must be in [1, {num_inference_steps}], got {steps_per_prompt}")
    model = denoiser_of(pipe)
    rng = random.Random(seed)
    extra = dict(call_kwargs or {})
    result = CalibrationSet(
        prompts=list(prompts),
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        seed=seed,
        height=extra.get("height"),
        width=extra.get("width"),
    )
    state = {"step": 0, "keep": set()}

    signature = inspect.signature(model.forward)

    def hook(_module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        if state["step"] in state["keep"]:
            # Positional arguments are stored under their parameter names, so every call replays as keywords.
            bound = signature.bind(*args, **kwargs) if args else None
            call = dict(bound.arguments) if bound is not None else kwargs
            result.calls.append(_to_cpu(call))
        state["step"] += 1

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    if guidance_scale is not None:
        extra["guidance_scale"] = guidance_scale
    # The pipeline's own per-call progress bar would print once per prompt; ours counts prompts instead.
    bar_config = getattr(pipe, "_progress_bar_config", None)
    if callable(getattr(pipe, "set_progress_bar_config", None)):
        pipe.set_progress_bar_config(disable=True)
    try:
        for i, prompt in enumerate(tqdm(prompts, desc="calibration prompts", disable=not progress)):
            keep = sorted(rng.sample(range(num_inference_steps), steps_per_prompt))
            state["step"], state["keep"] = 0, set(keep)
            result.steps.append(keep)
            gen = torch.Generator("cpu").manual_seed(seed + i)
            with torch.no_grad():
                pipe(prompt, num_inference_steps=num_inference_steps, generator=gen, output_type="latent", **extra)
            if on_progress:
                on_progress("capture", i + 1, len(prompts))
    finally:
        handle.remove()
        if hasattr(pipe, "_progress_bar_config"):
            pipe._progress_bar_config = bar_config if bar_config is not None else {}
    return result


def move_call(value: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """A recorded call on the model's device, floating-point tensors in the model's dtype."""
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=dtype if value.is_floating_point() else value.dtype)
    if isinstance(value, dict):
        return {k: move_call(x, device, dtype) for k, x in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(move_call(x, device, dtype) for x in value)
    return value


def run_calls(
    model: nn.Module,
    calls: Sequence[dict[str, Any]],
    progress: bool = True,
    desc: str = "calibration pass",
    on_call: Callable[[int], None] | None = None,
) -> None:
    """Feed recorded calls through ``model`` (on the model's device), discarding outputs."""
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    with torch.no_grad():
        for i, call in enumerate(tqdm(calls, desc=desc, disable=not progress)):
            if on_call:
                on_call(i)
            model(**move_call(call, device, dtype))
