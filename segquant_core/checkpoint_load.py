"""Load a format-2 checkpoint without ever materialising the float denoiser.

The denoiser is built from its ``config.json`` on the meta device (no memory), its quantized linears are
replaced by empty SegLinears from the manifest, and every tensor is then read from the safetensors file
(memory-mapped, one tensor at a time) and assigned in place: float tensors converted to the reference
precision on the target device, quantized tensors as stored. The only float weights that ever exist are
those that stay float.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from segquant_core.artifacts import (
    CONFIG_FILE,
    ArtifactError,
    build_layer,
    layer_configs,
    read_manifest,
    result_from_manifest,
    set_submodule,
    tensors_file,
)
from segquant_core.backends import assign_backends
from segquant_core.seglinear import SegLinear, tensor_bytes_once

CONVERT_HINT = (
    "format-1 artifacts hold only the quantized layers and need their float model; convert once "
    "with sq.load(DIR, float_denoiser) then sq.save(float_denoiser, NEW_DIR), or rebuild with "
    "`segquant quantize MODEL --recipe R --out NEW_DIR`"
)


def _denoiser_class(name: str) -> type[nn.Module]:
    """The diffusers model class a config names (the only classes a checkpoint may instantiate)."""
    diffusers = importlib.import_module("diffusers")
    cls = getattr(diffusers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module) and hasattr(cls, "from_config")):
        raise ArtifactError(f"config.json names {name!r}, which is not a diffusers model class")
    return cls


def _assign(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    owner_name, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    if attr in owner._parameters:
        owner._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
    elif attr in owner._buffers:
        owner._buffers[attr] = tensor
    else:
        raise ArtifactError(f"checkpoint tensor {name!r} is not a parameter or buffer of {type(model).__name__}")


def load_denoiser(
    directory: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    backend: str = "auto",
) -> nn.Module:
    """The quantized denoiser a format-2 checkpoint holds, ready to run on ``device``.

    ``dtype`` is the reference precision for the float tensors that stay float (default: as stored).
    Raises :class:`ArtifactError` for format-1 artifacts (with how to convert them), a missing or foreign
    ``config.json``, or tensors that do not fit the model.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    if manifest["format_version"] == 1:
        raise ArtifactError(f"{directory}: {CONVERT_HINT}")
    if not manifest.get("denoiser", {}).get("config"):
        raise ArtifactError(
            f"{directory}: the checkpoint has no {CONFIG_FILE} (its model is not a diffusers "
            "model); load it into a model with sq.load(DIR, model)"
        )
    config: dict[str, Any] = json.loads((directory / CONFIG_FILE).read_text())
    cls = _denoiser_class(str(config.get("_class_name", "")))
    with torch.device("meta"):
        model: nn.Module = cls.from_config(config)  # type: ignore[attr-defined]
    configs = layer_configs(manifest)
    modules = dict(model.named_modules())
    for name in configs:
        if not isinstance(modules.get(name), nn.Linear):
            raise ArtifactError(f"artifact layer {name!r} is not a linear layer of {cls.__name__}")
    device = torch.device(device)
    owned = tuple(n + "." for n in configs)
    states: dict[str, dict[str, torch.Tensor]] = {n: {} for n in configs}
    with safe_open(str(tensors_file(directory, manifest)), framework="pt", device=str(device)) as f:
        for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
            t = f.get_tensor(key)
            if key.startswith(owned):
                layer = next(n for n in configs if key.startswith(n + "."))
                states[layer][key[len(layer) + 1 :]] = t
                continue
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            _assign(model, key, t)
    layers = {name: build_layer(name, cfg, states[name]) for name, cfg in configs.items()}
    for name, layer in layers.items():
        set_submodule(model, name, layer)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ArtifactError(
            f"{directory}: the checkpoint lacks {len(left)} tensor(s) of {cls.__name__}, e.g. {', '.join(left[:3])}"
        )
    model.eval()
    result = result_from_manifest(manifest, layers)
    result.backends = assign_backends(model, backend)
    model.segquant = result  # type: ignore[assignment]
    return model


def replace_denoiser(pipe: Any, denoiser: nn.Module) -> None:
    """Put ``denoiser`` in ``pipe`` in place of its ``transformer`` / ``unet`` (dropping the old one)."""
    for attr in ("transformer", "unet"):
        if isinstance(getattr(pipe, attr, None), nn.Module):
            register = getattr(pipe, "register_modules", None)
            if callable(register):
                register(**{attr: denoiser})
            else:
                setattr(pipe, attr, denoiser)
            return
    raise ValueError(f"{type(pipe).__name__} has no 'transformer' or 'unet' component to replace")


def resident_bytes(model: nn.Module) -> int:
    """Bytes ``model`` really holds: parameters and buffers not on the meta device, each storage once,
    plus every SegLinear's kernel state (prepacked weights, lazily packed small-M kernels)."""
    seen: set[int] = set()
    total = 0
    layers = [m for m in model.modules() if isinstance(m, SegLinear)]
    for layer in layers:
        total += layer.resident_bytes(seen)
    owned = {id(t) for layer in layers for t in layer.buffers()}
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in owned:
            total += tensor_bytes_once(t, seen)
    return total
