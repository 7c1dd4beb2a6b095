"""Quantized checkpoints on disk: ``config.json`` + ``model.safetensors`` + ``manifest.json``. Never pickle.

Format 2 (written now) is self-contained: ``model.safetensors`` holds the whole denoiser — every float
parameter and buffer that stays float, in the precision it was saved in, and for every quantized layer
``name`` its SegLinear buffers (``name.segs.<k>.weight`` int8 / packed-int4 uint8 / float8,
``…weight_scale``, ``…smooth``, ``…act_scale``, ``…lowrank_down``/``up``, ``name.bias``). ``config.json``
is the denoiser's own diffusers config, so :mod:`.checkpoint_load` can build the model on the meta device
and never hold the float weights of the quantized layers. The manifest records the engine version, the
recipe, the plan, each layer's SegLinear config, the calibration settings and their fingerprint, the
source model and library versions.

Format 1 (``quantized.safetensors`` with the quantized layers only) still loads into a float model with
:func:`load`. Writing goes to a temporary folder that is renamed into place, so a failed save leaves
nothing half-written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from segquant_core.backends import assign_backends
from segquant_core.calibrate.build import LayerReport, SegmentReport
from segquant_core.detect.plan import Plan
from segquant_core.quantize import QuantizationResult, kept_weights_sha256
from segquant_core.recipes import Recipe
from segquant_core.seglinear import SegLinear, SegLinearConfig

logger = logging.getLogger(__name__)

FORMAT = "segquant-artifact"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
TENSORS_FILE = "model.safetensors"
LEGACY_TENSORS_FILE = "quantized.safetensors"  # format 1
MANIFEST_FILE = "manifest.json"
CONFIG_FILE = "config.json"
# Bump whenever a change to the engine can change the codes or scales it builds from the same calibration
# data (rounding, α grid, GPTQ, grouping of scales ...): checkpoints built before then are stale.
ENGINE_NUMERICS = 1


class ArtifactError(ValueError):
    """The artifact cannot be read, or does not fit the model it is loaded into."""


def engine_version() -> dict[str, Any]:
    """What the manifest records about the engine that built a checkpoint."""
    try:
        version = metadata.version("segquant-serve")
    except metadata.PackageNotFoundError:
        version = "unknown"
    return {"package": version, "numerics": ENGINE_NUMERICS}


def calibration_fingerprint(calibration: dict[str, Any]) -> str:
    """sha256 of the calibration settings that decide the recorded data (prompts, steps, seed, guidance)."""
    keys = ("samples", "prompts_sha256", "num_inference_steps", "recorded_steps", "guidance_scale", "seed")
    picked = {k: calibration.get(k) for k in keys}
    return hashlib.sha256(json.dumps(picked, sort_keys=True, default=str).encode()).hexdigest()


def _versions() -> dict[str, str]:
    out = {}
    for pkg in ("torch", "diffusers", "safetensors", "segquant-serve"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "unknown"
    return out


def _all_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer (persistent or not) by name, with SegLinear codes re-derived if released."""
    tensors: dict[str, torch.Tensor] = {}
    quantized = {name: m for name, m in model.named_modules() if isinstance(m, SegLinear)}
    for name, layer in quantized.items():
        for key, t in layer.stored_state().items():
            tensors[f"{name}.{key}"] = t
    owned = tuple(n + "." for n in quantized)
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t is not None and not name.startswith(owned):
            tensors[name] = t
    seen: set[int] = set()
    out = {}
    for name, t in tensors.items():
        t = t.detach().to("cpu")
        ptr = t.untyped_storage().data_ptr()
        # safetensors refuses tensors that share storage (views of one buffer): store a copy of those
        out[name] = t.clone() if ptr in seen or not t.is_contiguous() else t
        seen.add(ptr)
    return out


def _denoiser_config(model: nn.Module) -> dict[str, Any] | None:
    """The model's diffusers config (with ``_class_name``), or None for a plain ``nn.Module``."""
    to_json = getattr(model, "to_json_string", None)
    if not callable(to_json) or not hasattr(model, "config"):
        return None
    return json.loads(to_json())


def save(model: nn.Module, directory: str | Path, *, source: dict[str, Any] | None = None) -> Path:
    """Write ``model`` (quantized by :func:`~segquant_core.quantize`) as a self-contained checkpoint."""
    result: QuantizationResult | None = getattr(model, "segquant", None)
    if result is None:
        raise ArtifactError("this model was not quantized by segquant_core.quantize (no model.segquant record)")
    directory = Path(directory)
    layers = {name: m.cfg.to_dict() for name, m in model.named_modules() if isinstance(m, SegLinear)}
    tensors = _all_tensors(model)
    config = _denoiser_config(model)
    float_dtypes = sorted(
        {
            str(t.dtype).removeprefix("torch.")
            for name, t in tensors.items()
            if t.is_floating_point() and not name.startswith(tuple(n + "." for n in layers))
        }
    )
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "engine": engine_version(),
        "recipe": result.recipe.to_dict(),
        "plan": result.plan.to_list(),
        "layers": layers,
        "excluded": result.excluded,
        "denoiser": {
            "class": type(model).__name__,
            "config": CONFIG_FILE if config else None,
            "float_dtypes": float_dtypes,
        },
        "source": {**result.source, **(source or {})},
        "calibration": result.calibration,
        "calibration_fingerprint": calibration_fingerprint(result.calibration),
        "reports": {
            n: {
                "alpha": [s.alpha for s in r.segments],
                "alpha_errors": [{str(a): e for a, e in s.errors.items()} for s in r.segments],
                "gptq": [s.gptq for s in r.segments],
                "lowrank_rank": r.lowrank_rank,
                "rank_capped": r.rank_capped,
            }
            for n, r in result.layers.items()
        },
        "summary": result.summary(),
        "versions": _versions(),
    }
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        save_file(tensors, str(tmp / TENSORS_FILE), metadata={"format": FORMAT, "format_version": "2"})
        if config is not None:
            (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
        _readable(tmp)
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


def _readable(folder: Path) -> None:
    """mkdtemp makes the folder owner-only; a checkpoint is read by other users (workers, containers)."""
    folder.chmod(0o755)
    for f in folder.iterdir():
        f.chmod(0o644)


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
    if manifest.get("format_version") not in READABLE_VERSIONS:
        raise ArtifactError(
            f"{path}: artifact format version {manifest.get('format_version')} "
            f"is not supported (this engine reads {', '.join(map(str, READABLE_VERSIONS))})"
        )
    return manifest


def tensors_file(directory: str | Path, manifest: dict[str, Any]) -> Path:
    return Path(directory) / (LEGACY_TENSORS_FILE if manifest["format_version"] == 1 else TENSORS_FILE)


def layer_configs(manifest: dict[str, Any]) -> dict[str, SegLinearConfig]:
    return {name: SegLinearConfig.from_dict(d) for name, d in manifest["layers"].items()}


def build_layer(name: str, cfg: SegLinearConfig, state: dict[str, torch.Tensor]) -> SegLinear:
    """A SegLinear whose buffers *are* ``state`` (no zero-filled copy first)."""
    layer = SegLinear.empty(cfg)
    try:
        layer.assign_state(state)
    except ValueError as e:
        raise ArtifactError(f"artifact tensors for {name!r} do not match its config: {e}") from None
    return layer


def result_from_manifest(manifest: dict[str, Any], layers: dict[str, SegLinear]) -> QuantizationResult:
    """The :class:`QuantizationResult` a checkpoint describes (kept on the model as ``model.segquant``)."""
    result = QuantizationResult(
        recipe=Recipe.from_dict(manifest["recipe"]),
        plan=Plan.from_list(manifest["plan"]),
        excluded=list(manifest.get("excluded", [])),
        calibration=manifest.get("calibration", {}),
        source=manifest.get("source", {}),
    )
    for name, rep in manifest.get("reports", {}).items():
        segs = [
            SegmentReport(alpha=a, errors={float(k): v for k, v in errs.items()}, gptq=g)
            for a, errs, g in zip(rep["alpha"], rep["alpha_errors"], rep["gptq"])
        ]
        result.layers[name] = LayerReport(name, segs, rep.get("lowrank_rank", 0), rep.get("rank_capped", False))
    result.quantized_bytes = sum(layer.weight_nbytes() for layer in layers.values())
    result.float_bytes = int(manifest.get("summary", {}).get("float_bytes", 0))
    return result


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def load(
    directory: str | Path, model: nn.Module, *, backend: str = "auto", check_source: bool = True
) -> QuantizationResult:
    """Replace ``model``'s linears by the artifact's quantized layers (no recalibration, no pickle).

    Works for both formats; the float weights stay those of ``model``. To load without a float model,
    use :func:`segquant_core.load_denoiser`. Raises :class:`ArtifactError` naming the first layer that is
    missing from ``model`` or has other sizes.
    """
    manifest = read_manifest(directory)
    modules = dict(model.named_modules())
    configs = layer_configs(manifest)
    for name, cfg in configs.items():
        mod = modules.get(name)
        if mod is None:
            raise ArtifactError(f"artifact layer {name!r} does not exist in {type(model).__name__}")
        if not isinstance(mod, nn.Linear):
            raise ArtifactError(f"artifact layer {name!r} is a {type(mod).__name__} in the model, expected nn.Linear")
        if (mod.in_features, mod.out_features) != (cfg.in_features, cfg.out_features):
            raise ArtifactError(
                f"artifact layer {name!r} is {cfg.in_features}→{cfg.out_features} but the model's is "
                f"{mod.in_features}→{mod.out_features}"
            )
    new_layers: dict[str, SegLinear] = {}
    with safe_open(str(tensors_file(directory, manifest)), framework="pt") as f:
        keys = list(f.keys())
        for name, cfg in configs.items():
            prefix = name + "."
            state = {
                k[len(prefix) :]: f.get_tensor(k)
                for k in keys
                if k.startswith(prefix) and k[len(prefix) :].startswith(("segs.", "bias"))
            }
            device = modules[name].weight.device
            new_layers[name] = build_layer(name, cfg, state).to(device)
    for name, layer in new_layers.items():
        set_submodule(model, name, layer)
    result = result_from_manifest(manifest, new_layers)
    result.backends = assign_backends(model, backend)
    if check_source and result.source.get("kept_sha256") and kept_weights_sha256(model) != result.source["kept_sha256"]:
        logger.warning(
            "the float weights of %s differ from the model this artifact was calibrated on; results may not match",
            type(model).__name__,
        )
    model.segquant = result  # type: ignore[assignment]
    return result
