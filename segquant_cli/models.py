"""Load a diffusers pipeline or a bare denoiser from a directory (or a hub id, when online).

A *pipeline* directory has ``model_index.json``; a *model* directory has ``config.json`` with a diffusers
``_class_name``. Pipeline classes are looked up in diffusers first, then among this project's own
pipelines (``segquant_shapes``), so the shipped models load like any other. Components saved as null (SD3
without T5) are passed back as ``None``, ``drop`` leaves optional ones out on purpose, and weights come
from safetensors only (:mod:`service.pipeline_folder`).
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

from segquant_cli.errors import CLIError

DENOISER_COMPONENTS = ("transformer", "unet")


def _diffusers_class(name: str) -> Any | None:
    import diffusers

    return getattr(diffusers, name, None)


def pipeline_class(name: str) -> Any:
    cls = _diffusers_class(name)
    if cls is not None:
        return cls
    try:
        module = importlib.import_module("segquant_shapes.pipelines")
    except ImportError:
        module = None
    if module is not None and hasattr(module, name):
        return getattr(module, name)
    raise CLIError(f"unknown pipeline class {name!r} (not in diffusers or segquant_shapes)")


def is_pipeline_dir(path: Path) -> bool:
    return (path / "model_index.json").is_file()


def load_pipeline(path: str | Path, drop: tuple[str, ...] = (), **kwargs: Any) -> Any:
    """A pipeline from a directory, ``shipped:<name>`` (the project's own models) or a hub id.

    ``drop`` names optional components to load as ``None`` (a dropped text encoder takes its tokenizer).
    """
    from service.pipeline_folder import expand_drop, load_pipeline_folder, read_model_index

    if str(path).startswith("shipped:"):
        try:
            from segquant_shapes import load_shipped
        except ImportError:
            raise CLIError("shipped models need the segquant_shapes package") from None
        try:
            return load_shipped(str(path).split(":", 1)[1])
        except (FileNotFoundError, KeyError, ValueError) as e:
            raise CLIError(f"{path}: {e}") from None
    p = Path(path)
    if not p.exists():
        if "/" in str(path) and not str(path).startswith((".", "/")):
            from diffusers import DiffusionPipeline

            gone = {name: None for name in drop}
            gone.update(
                {"tokenizer" + n.removeprefix("text_encoder"): None for n in drop if n.startswith("text_encoder")}
            )
            try:
                return DiffusionPipeline.from_pretrained(str(path), use_safetensors=True, **gone, **kwargs)
            except Exception as e:  # network / hub errors come in many types
                raise CLIError(f"could not load {path!r} from the hub: {e}") from None
        raise CLIError(f"{path}: no such directory")
    if not is_pipeline_dir(p):
        raise CLIError(f"{path}: not a diffusers pipeline directory (no model_index.json)")
    index = read_model_index(p)
    try:
        expand_drop(index, drop)
    except ValueError as e:
        raise CLIError(f"--drop-components: {e}") from None
    return load_pipeline_folder(p, pipeline_class(index.get("_class_name", "")), drop=drop, **kwargs)


def load_denoiser(path: str | Path, component: str | None = None, drop: tuple[str, ...] = ()) -> tuple[Any, Any | None]:
    """``(denoiser, pipeline or None)`` from a pipeline dir, a model dir or a hub id."""
    from torch import nn  # imported here so `segquant serve/worker --help` start without torch

    p = Path(path)
    if p.is_dir() and not is_pipeline_dir(p):
        cfg_file = p / "config.json"
        if not cfg_file.is_file():
            raise CLIError(f"{path}: neither a pipeline (model_index.json) nor a model directory (config.json)")
        name = json.loads(cfg_file.read_text()).get("_class_name")
        cls = _diffusers_class(name or "")
        if cls is None:
            raise CLIError(f"{path}: config.json names {name!r}, which is not a diffusers model class")
        return cls.from_pretrained(str(p), use_safetensors=True), None
    pipe = load_pipeline(path, drop)
    names = [component] if component else list(DENOISER_COMPONENTS)
    for name in names:
        module = getattr(pipe, name, None)
        if isinstance(module, nn.Module):
            return module, pipe
    raise CLIError(f"{path}: the pipeline has no {' or '.join(names)} component")
