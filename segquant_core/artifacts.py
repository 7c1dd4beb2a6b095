"""Quantized artifacts on disk: ``quantized.safetensors`` + ``manifest.json``. Never pickle.

The safetensors file holds, for every quantized layer ``name``, its SegLinear buffers
(``name.segs.<k>.weight`` int8 / packed-int4 uint8 / float8, ``…weight_scale``, ``…smooth``,
``…act_scale``, ``…lowrank_down``/``up``, ``name.bias``) — the float part of the model is *not* stored; it
comes from the source model the manifest names. The manifest holds the recipe, the plan, each layer's
SegLinear config, the source model (class, path/id, hash of the float weights that stay float), library
versions and calibration details. Writing goes to a temporary folder that is renamed into place, so a
failed save leaves nothing half-written.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from segquant_core.backends import assign_backends
from segquant_core.calibrate.build import LayerReport, SegmentReport
from segquant_core.detect.plan import Plan
from segquant_core.quantize import QuantizationResult, kept_weights_sha256
from segquant_core.recipes import Recipe
from segquant_core.seglinear import SegLinear, SegLinearConfig

logger = logging.getLogger(__name__)

FORMAT = "segquant-artifact"
FORMAT_VERSION = 1
TENSORS_FILE = "quantized.safetensors"
MANIFEST_FILE = "manifest.json"


class ArtifactError(ValueError):
    """The artifact cannot be read, or does not fit the model it is loaded into."""


def _versions() -> dict[str, str]:
    out = {}
    for pkg in ("torch", "diffusers", "safetensors", "segquant-serve"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "unknown"
    return out


def save(model: nn.Module, directory: str | Path, *, source: dict[str, Any] | None = None) -> Path:
    """Write ``model``'s quantized layers (as produced by :func:`~segquant_core.quantize`) to ``directory``."""
    result: QuantizationResult | None = getattr(model, "segquant", None)
    if result is None:
        raise ArtifactError("this model was not quantized by segquant_core.quantize (no model.segquant record)")
    directory = Path(directory)
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, Any] = {}
    for name, module in model.named_modules():
        if isinstance(module, SegLinear):
            layers[name] = module.cfg.to_dict()
            for key, t in module.state_dict().items():
                tensors[f"{name}.{key}"] = t.detach().to("cpu").contiguous()
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "recipe": result.recipe.to_dict(),
        "plan": result.plan.to_list(),
        "layers": layers,
        "excluded": result.excluded,
        "source": {**result.source, **(source or {})},
        "calibration": result.calibration,
        "reports": {n: {"alpha": [s.alpha for s in r.segments],
                        "alpha_errors": [{str(a): e for a, e in s.errors.items()} for s in r.segments],
                        "gptq": [s.gptq for s in r.segments],
                        "lowrank_rank": r.lowrank_rank, "rank_capped": r.rank_capped}
                    for n, r in result.layers.items()},
        "summary": result.summary(),
        "versions": _versions(),
    }
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        save_file(tensors, str(tmp / TENSORS_FILE), metadata={"format": FORMAT})
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(directory, old)
            os.replace(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def read_manifest(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / MANIFEST_FILE
    if not path.is_file():
        raise ArtifactError(f"{directory}: no {MANIFEST_FILE} — not a segquant artifact")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path}: not valid JSON ({e})") from None
    if manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path}: not a segquant artifact (format {manifest.get('format')!r})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{path}: artifact format version {manifest.get('format_version')} "
                            f"is not supported (this engine reads {FORMAT_VERSION})")
    return manifest


def load(directory: str | Path, model: nn.Module, *, backend: str = "auto",
         check_source: bool = True) -> QuantizationResult:
    """Replace ``model``'s linears by the artifact's quantized layers (no recalibration, no pickle).

    Raises :class:`ArtifactError` naming the first layer that is missing from ``model`` or has other sizes.
    """
    manifest = read_manifest(directory)
    modules = dict(model.named_modules())
    configs = {name: SegLinearConfig.from_dict(d) for name, d in manifest["layers"].items()}
    for name, cfg in configs.items():
        mod = modules.get(name)
        if mod is None:
            raise ArtifactError(f"artifact layer {name!r} does not exist in {type(model).__name__}")
        if not isinstance(mod, nn.Linear):
            raise ArtifactError(f"artifact layer {name!r} is a {type(mod).__name__} in the model, expected nn.Linear")
        if (mod.in_features, mod.out_features) != (cfg.in_features, cfg.out_features):
            raise ArtifactError(
                f"artifact layer {name!r} is {cfg.in_features}→{cfg.out_features} but the model's is "
                f"{mod.in_features}→{mod.out_features}")
    tensors = load_file(str(Path(directory) / TENSORS_FILE))
    new_layers: dict[str, SegLinear] = {}
    for name, cfg in configs.items():
        layer = SegLinear(cfg)
        prefix = name + "."
        state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        try:
            layer.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ArtifactError(f"artifact tensors for {name!r} do not match its config: {e}") from None
        device = modules[name].weight.device
        new_layers[name] = layer.to(device)
    for name, layer in new_layers.items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
    result = QuantizationResult(recipe=Recipe.from_dict(manifest["recipe"]), plan=Plan.from_list(manifest["plan"]),
                                excluded=list(manifest.get("excluded", [])),
                                calibration=manifest.get("calibration", {}), source=manifest.get("source", {}))
    for name, rep in manifest.get("reports", {}).items():
        segs = [SegmentReport(alpha=a, errors={float(k): v for k, v in errs.items()}, gptq=g)
                for a, errs, g in zip(rep["alpha"], rep["alpha_errors"], rep["gptq"])]
        result.layers[name] = LayerReport(name, segs, rep.get("lowrank_rank", 0), rep.get("rank_capped", False))
    result.quantized_bytes = sum(layer.weight_nbytes() for layer in new_layers.values())
    result.float_bytes = int(manifest.get("summary", {}).get("float_bytes", 0))
    result.backends = assign_backends(model, backend)
    if check_source and result.source.get("kept_sha256") \
            and kept_weights_sha256(model) != result.source["kept_sha256"]:
        logger.warning("the float weights of %s differ from the model this artifact was calibrated on; "
                       "results may not match", type(model).__name__)
    model.segquant = result  # type: ignore[assignment]
    return result
