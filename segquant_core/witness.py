"""A checkpoint's witness: one small layer's calibration statistics, so a test can rebuild it in seconds.

Rebuilding a whole checkpoint means re-running calibration (minutes). The witness keeps what the engine
saw at one layer whose input is a raw model input (so it does not depend on how other layers were
quantized): its per-channel maxima, its seeded row sample and, for GPTQ, its ``Σ xxᵀ``. Rebuilding that
layer from the witness with today's engine must give the checkpoint's codes and scales bit for bit; if it
does not, the engine's numerics changed and the checkpoint is stale.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from segquant_core.artifacts import ArtifactError, layer_configs, read_manifest, tensors_file
from segquant_core.calibrate.build import build_seglinear
from segquant_core.calibrate.capture import run_calls
from segquant_core.calibrate.observer import InputObserver, InputStats
from segquant_core.detect.plan import LayerPlan, Plan
from segquant_core.recipes import Recipe

WITNESS_FILE = "witness.safetensors"


def observe_layer(
    model: nn.Module,
    name: str,
    calls: Sequence[dict[str, Any]],
    spec_gptq: bool,
    segments: Any,
    *,
    rows_per_layer: int = 2048,
    seed: int = 0,
) -> InputStats:
    """The statistics :func:`~segquant_core.quantize` gathers for layer ``name`` over ``calls``
    (same row budget and per-layer seed, so the same rows are sampled)."""
    linear = model.get_submodule(name)
    if not isinstance(linear, nn.Linear):
        raise ValueError(f"witness layer {name!r} is not an nn.Linear")
    rows_per_call = max(1, math.ceil(rows_per_layer / max(1, len(calls) // 2)))
    was_training = model.training
    model.eval()
    with InputObserver(
        {name: linear}, rows_per_call=rows_per_call, seed=seed, hessian_for={name: segments} if spec_gptq else None
    ) as observer:
        run_calls(model, calls, progress=False, on_call=lambda i: observer.start_call(i, len(calls)))
    model.train(was_training)
    return observer.stats[name]


def write_witness(directory: str | Path, name: str, stats: InputStats) -> Path:
    """Store ``stats`` of layer ``name`` next to the checkpoint."""
    tensors = {"pos_max": stats.pos_max, "neg_max": stats.neg_max, "rows": stats.sample()}
    if stats.fit_pos_max is not None and stats.fit_neg_max is not None:
        tensors.update(fit_pos_max=stats.fit_pos_max, fit_neg_max=stats.fit_neg_max)
    for i, h in enumerate(stats.hessians or []):
        tensors[f"hessian.{i}"] = h
    meta = {
        "layer": name,
        "in_features": stats.in_features,
        "count": stats.count,
        "hessian_bounds": [list(b) for b in stats.hessian_bounds],
    }
    path = Path(directory) / WITNESS_FILE
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in tensors.items()},
        str(path),
        metadata={"witness": json.dumps(meta)},
    )
    path.chmod(0o644)
    return path


def read_witness(directory: str | Path) -> tuple[str, InputStats]:
    path = Path(directory) / WITNESS_FILE
    if not path.is_file():
        raise ArtifactError(f"{directory}: no {WITNESS_FILE}")
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["witness"])
        t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    hessians = [t[f"hessian.{i}"] for i in range(len(meta["hessian_bounds"]))] or None
    stats = InputStats(
        int(meta["in_features"]),
        t["pos_max"],
        t["neg_max"],
        t.get("fit_pos_max"),
        t.get("fit_neg_max"),
        [t["rows"]],
        hessians,
        [tuple(b) for b in meta["hessian_bounds"]],
        None,
        int(meta["count"]),
    )
    return meta["layer"], stats


def witness_matches(directory: str | Path, float_linear: nn.Linear) -> tuple[bool, str]:
    """Rebuild the witness layer from its statistics and ``float_linear`` (the source model's layer) with
    today's engine; ``(True, "")`` when every stored tensor matches bit for bit, else the first mismatch."""
    manifest = read_manifest(directory)
    name, stats = read_witness(directory)
    recipe = Recipe.from_dict(manifest["recipe"])
    plan = Plan.from_list(manifest["plan"])
    spec = recipe.resolve(name, plan.get(name) or LayerPlan(name))
    if spec is None:
        return False, f"today's recipe keeps witness layer {name!r} in float"
    layer, _ = build_seglinear(name, float_linear, spec, stats)
    if layer.cfg != layer_configs(manifest)[name]:
        return False, f"{name}: the rebuilt layer's config differs"
    with safe_open(str(tensors_file(directory, manifest)), framework="pt") as f:
        for key, value in layer.state_dict().items():
            stored = f.get_tensor(f"{name}.{key}")
            if stored.dtype != value.dtype or not torch.equal(stored, value.cpu()):
                return False, f"{name}.{key}: rebuilt tensor differs from the checkpoint's"
    return True, ""
