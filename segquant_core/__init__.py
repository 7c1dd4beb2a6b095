"""segquant_core — SegQuant post-training quantization for diffusion models (SegLinear + DualScale).

Public API (see :mod:`segquant_core.api`)::

    plan = detect(model, example_kwargs)                 # per-linear plan, JSON-serialisable
    result = quantize(model, recipe("w8a8-segquant"), calibration)
    save(model, "artifact/") ; load("artifact/", fresh_model)
"""

from segquant_core.api import (
    ArtifactError,
    CalibrationSet,
    LayerPlan,
    Plan,
    QuantizationResult,
    Recipe,
    Segments,
    capture_calibration,
    denoiser_of,
    detect,
    load,
    load_into_pipeline,
    quantize,
    quantize_pipeline,
    read_manifest,
    recipe,
    recipe_names,
    save,
)
from segquant_core.backends import assign_backends, backend_names
from segquant_core.seglinear import SegLinear

__version__ = "0.1.0"

__all__ = [
    "ArtifactError",
    "CalibrationSet",
    "LayerPlan",
    "Plan",
    "QuantizationResult",
    "Recipe",
    "SegLinear",
    "Segments",
    "assign_backends",
    "backend_names",
    "capture_calibration",
    "denoiser_of",
    "detect",
    "load",
    "load_into_pipeline",
    "quantize",
    "quantize_pipeline",
    "read_manifest",
    "recipe",
    "recipe_names",
    "save",
]
