"""SegQuant shapes: small self-trained text-to-image diffusion models (MMDiT, UNet, Flux) for quantization work.

The project cannot download pretrained diffusion weights, so it trains its own on a procedural
"coloured shapes" world with a frozen pretrained MiniLM text encoder, and ships the weights here.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .models import PRESETS, build_denoiser
from .pipelines import (
    ShapesFluxPipeline,
    ShapesMMDiTPipeline,
    ShapesPipelineBase,
    ShapesUNetPipeline,
    make_pipeline,
)
from .splits import calibration_prompts, eval_prompts
from .text_encoder import encode_prompts

__all__ = [
    "ShapesFluxPipeline",
    "ShapesMMDiTPipeline",
    "ShapesPipelineBase",
    "ShapesUNetPipeline",
    "calibration_prompts",
    "encode_prompts",
    "eval_prompts",
    "load_pipeline",
    "load_shipped",
    "shipped_pipeline_path",
    "tiny_random_pipeline",
]

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
_CLASSES: dict[str, type[ShapesPipelineBase]] = {
    "ShapesMMDiTPipeline": ShapesMMDiTPipeline,
    "ShapesUNetPipeline": ShapesUNetPipeline,
    "ShapesFluxPipeline": ShapesFluxPipeline,
}
SHIPPED_MODELS: tuple[str, ...] = ("mmdit", "unet", "flux")


def shipped_pipeline_path(name: str = "mmdit") -> Path:
    """Directory of a shipped pipeline ('mmdit', 'unet' or 'flux'); it may not exist before export."""
    if name not in SHIPPED_MODELS:
        raise ValueError(f"unknown shipped model {name!r}")
    return WEIGHTS_DIR / name


def load_pipeline(path: str | Path, dtype: torch.dtype = torch.float32) -> ShapesPipelineBase:
    """Load a saved shapes pipeline offline, picking the class from its model_index.json."""
    import json

    path = Path(path)
    cls_name = json.loads((path / "model_index.json").read_text())["_class_name"]
    pipe = _CLASSES[cls_name].from_pretrained(path, local_files_only=True)
    return pipe.to(dtype) if dtype != torch.float32 else pipe


def load_shipped(name: str = "mmdit", dtype: torch.dtype = torch.float32) -> ShapesPipelineBase:
    """The shipped trained pipeline, loaded without any network access."""
    path = shipped_pipeline_path(name)
    if not (path / "model_index.json").exists():
        raise FileNotFoundError(f"no shipped weights at {path}; run segquant_shapes.export first")
    return load_pipeline(path, dtype)


def tiny_random_pipeline(kind: str = "mmdit", seed: int = 0) -> ShapesPipelineBase:
    """A random-weight pipeline of the same classes (a few hundred K params) for fast tests."""
    torch.manual_seed(seed)
    pipe = make_pipeline(build_denoiser(kind, PRESETS[f"{kind}-tiny"]).eval())
    pipe.set_progress_bar_config(disable=True)
    return pipe
