"""Resolve a registry ``source`` to a loaded diffusers pipeline, and pick calibration prompts for it.

Sources: ``shipped:NAME`` (the project's trained models), ``tiny:KIND[:SEED]`` (random tiny weights, for
tests and development), a local pipeline folder, or a hub id (needs network access).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

# Used only when a source offers no calibration prompts of its own and none are configured.
_FALLBACK_PROMPTS = (
    "a red circle on a white background", "a small blue square in the top left corner",
    "a large green triangle", "a yellow star on a black background", "two purple circles",
    "an orange square next to a blue triangle", "a photo of a cat", "a landscape with mountains",
)


def load_source(source: str, dtype: torch.dtype, device: str) -> Any:
    """A pipeline for ``source`` in ``dtype`` on ``device``, with its progress bar off."""
    if source.startswith("shipped:"):
        import segquant_shapes

        pipe = segquant_shapes.load_shipped(source.split(":", 1)[1], dtype=dtype)
    elif source.startswith("tiny:"):
        import segquant_shapes

        parts = source.split(":")
        pipe = segquant_shapes.tiny_random_pipeline(parts[1], seed=int(parts[2]) if len(parts) > 2 else 0)
        if dtype != torch.float32:
            pipe = pipe.to(dtype=dtype)
    else:
        pipe = _load_path_or_hub(source, dtype)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _load_path_or_hub(source: str, dtype: torch.dtype) -> Any:
    path = Path(source).expanduser()
    if path.is_dir():
        index = path / "model_index.json"
        if not index.is_file():
            raise FileNotFoundError(f"{source}: not a diffusers pipeline folder (no model_index.json)")
        class_name = json.loads(index.read_text()).get("_class_name", "")
        if class_name.startswith("Shapes"):
            import segquant_shapes

            return segquant_shapes.load_pipeline(path, dtype=dtype)
        from diffusers import DiffusionPipeline

        return DiffusionPipeline.from_pretrained(str(path), torch_dtype=dtype, local_files_only=True)
    if source.startswith((".", "/", "~")):
        raise FileNotFoundError(f"{source}: no such pipeline folder")
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(source, torch_dtype=dtype)


def calibration_prompts(source: str, pipe: Any, count: int, prompts_file: Path | None) -> list[str]:
    """``count`` prompts: from the configured file, the model's own calibration split, or a fallback list."""
    if prompts_file is not None:
        prompts = [line.strip() for line in prompts_file.expanduser().read_text().splitlines() if line.strip()]
        if not prompts:
            raise ValueError(f"calibration prompts file {prompts_file} is empty")
    elif source.startswith(("shipped:", "tiny:")) or type(pipe).__name__.startswith("Shapes"):
        import segquant_shapes

        prompts = segquant_shapes.calibration_prompts(count)
    elif callable(getattr(pipe, "default_calibration_prompts", None)):
        prompts = list(pipe.default_calibration_prompts())
    else:
        logger.warning("no calibration prompts configured for %s; using a small generic list", source)
        prompts = list(_FALLBACK_PROMPTS)
    return (prompts * math.ceil(count / len(prompts)))[:count]
