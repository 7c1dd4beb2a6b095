"""The quantization flow: plan → observe calibration inputs once → build SegLinears → swap them in.

Calibration sees the float model's own activations (one hooked pass over the recorded denoiser calls);
every layer is then finalised from its cached statistics, so the α search never re-runs the model. The
model is left untouched until all layers are built, then the ``nn.Linear`` modules are replaced in one go
and a backend is chosen for each new layer.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn
from tqdm.auto import tqdm

from segquant_core.backends import assign_backends, select_backend
from segquant_core.calibrate.build import LayerReport, build_seglinear
from segquant_core.calibrate.capture import CalibrationSet, run_calls
from segquant_core.calibrate.observer import InputObserver
from segquant_core.detect.plan import LayerPlan, Plan
from segquant_core.recipes import LayerSpec, Recipe
from segquant_core.recipes import recipe as resolve_recipe
from segquant_core.seglinear import SegLinear

logger = logging.getLogger(__name__)


@dataclass
class QuantizationResult:
    """What :func:`quantize` did; kept on the model as ``model.segquant`` for :func:`save`."""

    recipe: Recipe
    plan: Plan
    layers: dict[str, LayerReport] = field(default_factory=dict)
    excluded: list[str] = field(default_factory=list)
    calibration: dict[str, Any] = field(default_factory=dict)
    backends: dict[str, int] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)
    float_bytes: int = 0  # bytes the quantized linears took before (in their original dtype)
    quantized_bytes: int = 0
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        """Counts for a one-screen report: formats, segmented and dual-scale layers, bytes."""
        formats: dict[str, int] = {}
        segmented = dual = 0
        for name in self.layers:
            rec = self.plan.get(name)
            spec = self.recipe.resolve(name, rec)
            if spec is None:
                continue
            act = spec.activation
            key = f"w:{spec.weight.fmt.value}/{spec.weight.granularity.value} " + (
                f"a:{act.fmt.value}/{act.granularity.value}{'/dynamic' if act.dynamic else ''}" if act else "a:float")
            formats[key] = formats.get(key, 0) + 1
            segmented += spec.segments is not None and spec.segments.count > 1
            dual += bool(act and act.dual)
        return {"recipe": self.recipe.name, "quantized_layers": len(self.layers),
                "excluded_layers": len(self.excluded), "formats": formats, "segmented_layers": segmented,
                "dual_scale_layers": dual, "float_bytes": self.float_bytes,
                "quantized_bytes": self.quantized_bytes, "backends": self.backends,
                "seconds": round(self.seconds, 2)}


def kept_weights_sha256(model: nn.Module) -> str:
    """Hash of every tensor *not* owned by a SegLinear: identifies the float part of a quantized model."""
    h = hashlib.sha256()
    quantized = {name for name, m in model.named_modules() if isinstance(m, SegLinear)}
    for name, tensor in sorted(model.state_dict().items()):
        owner = name.rsplit(".", 1)[0]
        if any(owner == q or owner.startswith(q + ".") for q in quantized):
            continue
        h.update(name.encode())
        h.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def validate_plan(model: nn.Module, plan: Plan) -> None:
    """Check that every plan record names a linear of ``model`` with matching sizes."""
    modules = dict(model.named_modules())
    for rec in plan:
        mod = modules.get(rec.layer)
        if not isinstance(mod, nn.Linear):
            what = "does not exist" if mod is None else f"is a {type(mod).__name__}, not nn.Linear"
            raise ValueError(f"plan layer {rec.layer!r} {what} in {type(model).__name__}")
        if rec.segments is not None:
            expect = mod.out_features if rec.segments.axis == "out" else mod.in_features
            if rec.segments.total != expect:
                raise ValueError(
                    f"plan layer {rec.layer!r}: {rec.segments.axis}-segment sizes sum to {rec.segments.total}, "
                    f"but the layer has {expect} {'output' if rec.segments.axis == 'out' else 'input'} features")


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _module_bytes(m: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(m.parameters()) + list(m.buffers()))


def quantize(model: nn.Module, recipe: str | Recipe, calibration: CalibrationSet | Sequence[dict[str, Any]],
             plan: Plan | None = None, *, backend: str = "auto", rows_per_layer: int = 2048, seed: int = 0,
             progress: bool = True) -> QuantizationResult:
    """Quantize ``model``'s linear layers in place with ``recipe``; returns what was done.

    ``calibration`` is a :class:`CalibrationSet` or a list of keyword dicts the model is called with.
    ``plan`` defaults to :func:`segquant_core.detect.detect` on the first calibration call.
    """
    start = time.perf_counter()
    r = resolve_recipe(recipe) if isinstance(recipe, str) else recipe
    calls = list(calibration.calls if isinstance(calibration, CalibrationSet) else calibration)
    if r.quantizes and not calls:
        raise ValueError("quantization needs at least one calibration call")
    if any(isinstance(m, SegLinear) for m in model.modules()):
        raise ValueError("this model already contains SegLinear layers; quantize a fresh float model")
    if plan is None:
        from segquant_core.detect import detect

        plan = detect(model, example_kwargs=calls[0]) if calls else Plan()
    validate_plan(model, plan)
    result = QuantizationResult(recipe=r, plan=plan)
    if isinstance(calibration, CalibrationSet):
        result.calibration = calibration.describe()
    else:
        result.calibration = {"samples": len(calls)}
    if not r.quantizes:
        result.seconds = time.perf_counter() - start
        return result

    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    specs: dict[str, LayerSpec] = {}
    for name in linears:
        spec = r.resolve(name, plan.get(name) or LayerPlan(name))
        if spec is None:
            result.excluded.append(name)
        else:
            specs[name] = spec
    targets = {n: linears[n] for n in specs}
    gptq_layers = {n: s.segments for n, s in specs.items() if s.gptq}
    rows_per_call = max(1, math.ceil(rows_per_layer / max(1, len(calls) // 2)))
    was_training = model.training
    model.eval()
    with InputObserver(targets, rows_per_call=rows_per_call, seed=seed,
                       hessian_for=gptq_layers or None) as observer:
        run_calls(model, calls, progress=progress, on_call=lambda i: observer.start_call(i, len(calls)))
    model.train(was_training)
    unseen = [n for n in targets if observer.stats[n].count == 0]
    if unseen:
        # Nothing to calibrate on (the calibration calls never reach these layers): keep them in float.
        logger.warning("%d linear layer(s) saw no calibration input and stay in floating point: %s",
                       len(unseen), ", ".join(unseen))
        for name in unseen:
            del targets[name]
        result.excluded.extend(unseen)

    new_layers: dict[str, SegLinear] = {}
    for name, lin in tqdm(targets.items(), desc=f"quantizing ({r.name})", disable=not progress):
        layer, report = build_seglinear(name, lin, specs[name], observer.stats[name])
        new_layers[name] = layer.to(lin.weight.device)
        result.layers[name] = report
        result.float_bytes += _module_bytes(lin)
        result.quantized_bytes += layer.weight_nbytes()
        observer.stats[name].rows.clear()
    for layer in new_layers.values():
        select_backend(layer, backend)  # an impossible backend request fails here, before the model changes
    for name, layer in new_layers.items():
        _set_submodule(model, name, layer)
    result.backends = assign_backends(model, backend)
    result.source = {"class": type(model).__name__, "kept_sha256": kept_weights_sha256(model)}
    result.seconds = time.perf_counter() - start
    model.segquant = result  # type: ignore[assignment]
    logger.info("quantized %d linears of %s with %s in %.1fs (%d excluded)", len(new_layers),
                type(model).__name__, r.name, result.seconds, len(result.excluded))
    return result


__all__ = ["QuantizationResult", "kept_weights_sha256", "quantize", "validate_plan"]
