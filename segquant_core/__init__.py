"""segquant_core — SegQuant post-training quantization for diffusion models (SegLinear + DualScale).

Public API (see :mod:`segquant_core.api`)::

    plan = detect(model, example_kwargs)                 # per-linear plan, JSON-serialisable
    result = quantize(model, recipe("w8a8-segquant"), calibration)
    save(model, "artifact/") ; load("artifact/", fresh_model)
"""

from segquant_core import api
from segquant_core.api import *  # noqa: F403 - the public surface is api.__all__
from segquant_core.backends import assign_backends, backend_names
from segquant_core.lora import (
    LoraError,
    LoraInfo,
    active_adapters,
    fuse_lora,
    list_loras,
    load_lora,
    set_adapters,
    unload_lora,
)
from segquant_core.seglinear import SegLinear

__version__ = "0.1.0"

__all__ = [
    *api.__all__,
    "SegLinear",
    "assign_backends",
    "backend_names",
    "LoraError",
    "LoraInfo",
    "active_adapters",
    "fuse_lora",
    "list_loras",
    "load_lora",
    "set_adapters",
    "unload_lora",
]
