"""A recorded calibration kept on disk, so rebuilding the shipped checkpoints after an engine change skips
the pipeline runs (the slowest part on a busy CPU) when the float weights and the calibration did not change.

One safetensors file per calibration: the recorded denoiser calls' tensors, plus a JSON header with the
calls' structure (non-tensor keywords such as ``return_dict``), how they were recorded, and the key they were
recorded under (float weights hash + calibration settings). A file whose key differs is ignored. No pickle.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from segquant_core.calibrate.capture import CalibrationSet

_HEADER_KEY = "segquant_calibration"
_FORMAT = 1


def calibration_key(settings: dict[str, Any], weights_sha256: str) -> str:
    """What a recorded calibration depends on: the float weights and how the calls were recorded."""
    text = json.dumps({"settings": settings, "weights_sha256": weights_sha256, "format": _FORMAT}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _encode(value: Any, name: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        tensors[name] = value.detach().cpu().contiguous().clone()
        return {"tensor": name}
    if isinstance(value, dict):
        return {"dict": {k: _encode(v, f"{name}.{k}", tensors) for k, v in value.items()}}
    if isinstance(value, (list, tuple)):
        kind = "list" if isinstance(value, list) else "tuple"
        return {kind: [_encode(v, f"{name}.{i}", tensors) for i, v in enumerate(value)]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return {"value": value}
    raise TypeError(f"cannot store a recorded {type(value).__name__} ({name}) in a calibration file")


def _decode(node: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Any:
    if "tensor" in node:
        return tensors[node["tensor"]]
    if "dict" in node:
        return {k: _decode(v, tensors) for k, v in node["dict"].items()}
    if "list" in node:
        return [_decode(v, tensors) for v in node["list"]]
    if "tuple" in node:
        return tuple(_decode(v, tensors) for v in node["tuple"])
    return node["value"]


def save_calibration(calib: CalibrationSet, path: Path, key: str) -> Path:
    """Write ``calib`` to ``path`` atomically (a half-written file is never read as a calibration)."""
    tensors: dict[str, torch.Tensor] = {}
    calls = [_encode(call, f"call{i}", tensors) for i, call in enumerate(calib.calls)]
    header = {
        "key": key,
        "calls": calls,
        "prompts": calib.prompts,
        "steps": calib.steps,
        "num_inference_steps": calib.num_inference_steps,
        "guidance_scale": calib.guidance_scale,
        "seed": calib.seed,
        "height": calib.height,
        "width": calib.width,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    save_file(tensors, str(partial), metadata={_HEADER_KEY: json.dumps(header)})
    os.replace(partial, path)
    return path


def load_calibration(path: Path, key: str) -> CalibrationSet | None:
    """The calibration stored at ``path`` if it was recorded under ``key``; None when absent or different."""
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        header = json.loads((f.metadata() or {}).get(_HEADER_KEY, "{}"))
        if header.get("key") != key:
            return None
        tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    return CalibrationSet(
        calls=[_decode(call, tensors) for call in header["calls"]],
        prompts=header["prompts"],
        steps=header["steps"],
        num_inference_steps=header["num_inference_steps"],
        guidance_scale=header["guidance_scale"],
        seed=header["seed"],
        height=header["height"],
        width=header["width"],
    )
