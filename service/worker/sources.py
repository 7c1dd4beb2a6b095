"""Resolve a registry ``source`` to a loaded diffusers pipeline, and pick calibration prompts for it.

Sources: ``shipped:NAME`` (the project's trained models), ``tiny:KIND[:SEED]`` (random tiny weights, for
tests and development), a local pipeline folder, or a hub id (needs network access). Folders and hub ids load
through :mod:`service.pipeline_folder`: components saved as null come back as ``None``, the registry's
``drop_components`` are left out, and only safetensors weights are read.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from segquant_core.prompts import choose_prompts, fit_count
from service.pipeline_folder import load_pipeline_folder, read_model_index

logger = logging.getLogger(__name__)


def load_source(source: str, dtype: torch.dtype, device: str, drop_components: Sequence[str] = ()) -> Any:
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
        pipe = _load_path_or_hub(source, dtype, tuple(drop_components))
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _load_path_or_hub(source: str, dtype: torch.dtype, drop: tuple[str, ...]) -> Any:
    from diffusers import DiffusionPipeline

    path = Path(source).expanduser()
    if path.is_dir():
        class_name = read_model_index(path).get("_class_name", "")
        if class_name.startswith("Shapes"):
            import segquant_shapes

            return segquant_shapes.load_pipeline(path, dtype=dtype)
        return load_pipeline_folder(path, DiffusionPipeline, drop=drop, dtype=dtype)
    if source.startswith((".", "/", "~")):
        raise FileNotFoundError(f"{source}: no such pipeline folder")
    gone = {name: None for name in drop}
    gone.update({"tokenizer" + n.removeprefix("text_encoder"): None for n in drop if n.startswith("text_encoder")})
    return DiffusionPipeline.from_pretrained(source, dtype=dtype, use_safetensors=True, **gone)


def calibration_prompts(source: str, pipe: Any, count: int, prompts_file: Path | None) -> list[str]:
    """``count`` prompts: the configured file, the model's own calibration split, or the general default set.

    Shapes models (``shipped:``, ``tiny:``) use their own split; any other model without prompts of its own
    gets :func:`segquant_core.prompts.general_calibration_prompts`, never the shapes prompts. One log line
    says which set was used.
    """
    given = None
    if prompts_file is not None:
        given = [line.strip() for line in prompts_file.expanduser().read_text().splitlines() if line.strip()]
        if not given:
            raise ValueError(f"calibration prompts file {prompts_file} is empty")
    elif source.startswith(("shipped:", "tiny:")) or type(pipe).__name__.startswith("Shapes"):
        import segquant_shapes

        logger.info("calibration prompts for %s: the Shapes models' calibration split", source)
        return fit_count(segquant_shapes.calibration_prompts(count), count)
    return choose_prompts(
        pipe, count, given=given, purpose="calibration", log=lambda line: logger.info("%s: %s", source, line)
    )
