"""Generate a fixed grid of (prompt, seed) images with a pipeline, keeping the final latents.

Every image gets its own ``torch.Generator(seed)``, so the float model and each quantized variant start
from exactly the same noise; the final latents are taken from the pipeline's step callback.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image
from tqdm.auto import tqdm


@dataclass
class Generations:
    prompts: list[str]
    seeds: list[int]
    images: dict[tuple[int, int], Image.Image] = field(default_factory=dict)  # (prompt idx, seed) → image
    latents: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def count(self) -> int:
        return len(self.images)


def generate_grid(
    pipe: Any,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    num_inference_steps: int,
    guidance_scale: float,
    call_kwargs: dict[str, Any] | None = None,
    desc: str = "generating",
    progress: bool = True,
) -> Generations:
    """One batched pipeline call per prompt (all seeds together), images and final latents kept."""
    out = Generations(list(prompts), list(seeds))
    set_cfg = getattr(pipe, "set_progress_bar_config", None)
    if callable(set_cfg):
        set_cfg(disable=True)
    start = time.perf_counter()
    for pi, prompt in enumerate(tqdm(prompts, desc=desc, disable=not progress)):
        final: dict[str, torch.Tensor] = {}

        def keep_latents(
            _pipe: Any, step: int, _t: Any, kwargs: dict[str, Any], final: dict[str, torch.Tensor] = final
        ) -> dict[str, Any]:
            final["latents"] = kwargs["latents"]
            return kwargs

        gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        result = pipe(
            [prompt] * len(seeds),
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            generator=gens,
            output_type="pil",
            callback_on_step_end=keep_latents,
            callback_on_step_end_tensor_inputs=["latents"],
            **(call_kwargs or {}),
        )
        for si, seed in enumerate(seeds):
            out.images[(pi, int(seed))] = result.images[si]
            if "latents" in final:
                out.latents[(pi, int(seed))] = final["latents"][si].detach().float().cpu()
    out.seconds = time.perf_counter() - start
    return out
