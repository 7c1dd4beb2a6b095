"""The quantization flow: plan → calibrate block by block (observe, build, free) → swap SegLinears in.

Calibration sees the float model's own activations. By default it is *block-sequential*
(:mod:`.calibrate.sequential`): all calibration calls advance through the denoiser one unit (block, or
top-level linear) at a time; a unit's layers are observed, built from their statistics and the statistics
freed before the next unit runs, so calibration memory is bounded by one block, not by the model's depth.
``sequential=False`` keeps the statistics of every layer from one whole-model pass (the reference the
equivalence tests compare against). Either way the model is left untouched until all layers are built,
then the ``nn.Linear`` modules are replaced in one go and a backend is chosen for each new layer.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn
from tqdm.auto import tqdm

from segquant_core.backends import assign_backends, select_backend
from segquant_core.calibrate.blocks import Unit, find_units
from segquant_core.calibrate.build import LayerReport, build_seglinear
from segquant_core.calibrate.capture import CalibrationSet, run_calls
from segquant_core.calibrate.input_store import InputStore, default_budget_bytes
from segquant_core.calibrate.observer import InputObserver
from segquant_core.calibrate.sequential import UnitRunsAgain, run_sequential
from segquant_core.detect.plan import LayerPlan, Plan
from segquant_core.recipes import LayerSpec, Recipe
from segquant_core.recipes import recipe as resolve_recipe
from segquant_core.seglinear import SegLinear

logger = logging.getLogger(__name__)

# on_progress(phase, done, total): "calibrate" counts finished units (sequential) or calls (whole-model),
# "build" counts built layers (whole-model only), "backends" is 0/1 then 1/1.
ProgressFn = Callable[[str, int, int], None]


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
    # how calibration ran: mode, units in execution order, peak recorded block-input bytes, spilled bytes
    calibration_run: dict[str, Any] = field(default_factory=dict)

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
                f"a:{act.fmt.value}/{act.granularity.value}{'/dynamic' if act.dynamic else ''}" if act else "a:float"
            )
            formats[key] = formats.get(key, 0) + 1
            segmented += spec.segments is not None and spec.segments.count > 1
            dual += bool(act and act.dual)
        return {
            "recipe": self.recipe.name,
            "quantized_layers": len(self.layers),
            "excluded_layers": len(self.excluded),
            "formats": formats,
            "segmented_layers": segmented,
            "dual_scale_layers": dual,
            "float_bytes": self.float_bytes,
            "quantized_bytes": self.quantized_bytes,
            "backends": self.backends,
            "seconds": round(self.seconds, 2),
        }


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
                    f"but the layer has {expect} {'output' if rec.segments.axis == 'out' else 'input'} features"
                )


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _module_bytes(m: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(m.parameters()) + list(m.buffers()))


def quantize(
    model: nn.Module,
    recipe: str | Recipe,
    calibration: CalibrationSet | Sequence[dict[str, Any]],
    plan: Plan | None = None,
    *,
    backend: str = "auto",
    rows_per_layer: int = 2048,
    seed: int = 0,
    progress: bool = True,
    sequential: bool = True,
    input_budget_bytes: int | None = None,
    spill_dir: str | Path | None = None,
    on_progress: ProgressFn | None = None,
) -> QuantizationResult:
    """Quantize ``model``'s linear layers in place with ``recipe``; returns what was done.

    ``calibration`` is a :class:`CalibrationSet` or a list of keyword dicts the model is called with.
    ``plan`` defaults to :func:`segquant_core.detect.detect` on the first calibration call.
    ``sequential`` calibrates block by block; the recorded block inputs stay on the model's device up to
    ``input_budget_bytes`` (default: half the free memory) and spill to files under ``spill_dir`` beyond.
    ``on_progress(phase, done, total)`` is called as calibration advances (see :data:`ProgressFn`).
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
    rows_per_call = max(1, math.ceil(rows_per_layer / max(1, len(calls) // 2)))
    calibrator = _Calibrator(targets, specs, result, rows_per_call=rows_per_call, seed=seed, calls=len(calls))
    was_training = model.training
    model.eval()
    try:
        fallback_reason = None
        if sequential:
            try:
                result.calibration_run = _calibrate_block_by_block(
                    model,
                    calls,
                    calibrator,
                    recipe_name=r.name,
                    progress=progress,
                    on_progress=on_progress,
                    input_budget_bytes=input_budget_bytes,
                    spill_dir=spill_dir,
                )
            except UnitRunsAgain as e:
                # A module reused within one forward (weight sharing) cannot be calibrated block by block; the
                # model is still untouched (layers are swapped only at the end), so start over in one pass.
                logger.warning("%s: calibrating with one whole-model pass instead", e)
                calibrator.close()
                calibrator = _Calibrator(
                    targets, specs, result, rows_per_call=rows_per_call, seed=seed, calls=len(calls)
                )
                sequential, fallback_reason = False, str(e)
        if not sequential:
            calibrator.whole_model(model, calls, progress=progress, on_progress=on_progress)
            result.calibration_run = {"mode": "whole-model"}
            if fallback_reason:
                result.calibration_run["fallback_reason"] = fallback_reason
    finally:
        calibrator.close()
        model.train(was_training)
    unseen = [n for n in targets if n not in calibrator.new_layers]
    if unseen:
        # Nothing to calibrate on (the calibration calls never reach these layers): keep them in float.
        logger.warning(
            "%d linear layer(s) saw no calibration input and stay in floating point: %s", len(unseen), ", ".join(unseen)
        )
        result.excluded.extend(unseen)

    new_layers = {n: calibrator.new_layers[n] for n in targets if n in calibrator.new_layers}
    result.layers = {n: result.layers[n] for n in new_layers}  # module order, whatever the build order
    if on_progress:
        on_progress("backends", 0, 1)
    for layer in new_layers.values():
        select_backend(layer, backend)  # an impossible backend request fails here, before the model changes
    for name, layer in new_layers.items():
        _set_submodule(model, name, layer)
    result.backends = assign_backends(model, backend)
    if on_progress:
        on_progress("backends", 1, 1)
    result.source = {"class": type(model).__name__, "kept_sha256": kept_weights_sha256(model)}
    result.seconds = time.perf_counter() - start
    model.segquant = result  # type: ignore[assignment]
    logger.info(
        "quantized %d linears of %s with %s in %.1fs (%d excluded)",
        len(new_layers),
        type(model).__name__,
        r.name,
        result.seconds,
        len(result.excluded),
    )
    return result


def _calibrate_block_by_block(
    model: nn.Module,
    calls: list[dict[str, Any]],
    calibrator: _Calibrator,
    *,
    recipe_name: str,
    progress: bool,
    on_progress: ProgressFn | None,
    input_budget_bytes: int | None,
    spill_dir: str | Path | None,
) -> dict[str, Any]:
    """Run every call through the denoiser one unit at a time, building each unit's layers as it passes.

    Returns the run's record (``QuantizationResult.calibration_run``); raises :class:`UnitRunsAgain` when
    the forward enters a unit twice.
    """
    units = find_units(model, calibrator.targets)
    finished = [0]
    with tqdm(total=len(units), desc=f"calibrating ({recipe_name})", unit="block", disable=not progress) as bar:

        def unit_done(unit: Unit) -> None:
            calibrator.end_unit(unit)
            finished[0] += 1
            bar.update(1)
            if on_progress:
                on_progress("calibrate", finished[0], len(units))

        device = next(model.parameters()).device
        budget = input_budget_bytes if input_budget_bytes is not None else default_budget_bytes(device)
        store = InputStore(budget, model, protected=calls, spill_dir=spill_dir)
        run = run_sequential(
            model, calls, units, begin=calibrator.begin_unit, enter=calibrator.enter, end=unit_done, store=store
        )
    if on_progress and finished[0] < len(units):  # units no call reached count as done
        on_progress("calibrate", len(units), len(units))
    return {
        "mode": "sequential",
        "units": run.order,
        "peak_input_bytes": run.peak_input_bytes,
        "spilled_bytes": run.spilled_bytes,
        "input_budget_bytes": budget,
    }


class _Calibrator:
    """Observes a group of layers, builds their SegLinears from the statistics, then frees them."""

    def __init__(
        self,
        targets: dict[str, nn.Linear],
        specs: dict[str, LayerSpec],
        result: QuantizationResult,
        *,
        rows_per_call: int,
        seed: int,
        calls: int,
    ) -> None:
        self.targets, self.specs, self.result = targets, specs, result
        self.rows_per_call, self.seed, self.calls = rows_per_call, seed, calls
        self.new_layers: dict[str, SegLinear] = {}
        self.observer: InputObserver | None = None
        self._direct = False  # the unit is a single linear, observed from the inputs it waits with

    def _observer(self, names: Sequence[str], hooks: bool) -> InputObserver:
        layers = {n: self.targets[n] for n in names}
        gptq = {n: self.specs[n].segments for n in names if self.specs[n].gptq}
        return InputObserver(
            layers, rows_per_call=self.rows_per_call, seed=self.seed, hessian_for=gptq or None, hooks=hooks
        )

    def begin_unit(self, unit: Unit) -> None:
        self._direct = unit.layers == (unit.name,) and unit.module is self.targets[unit.name]
        self.observer = self._observer(unit.layers, hooks=not self._direct)

    def enter(self, unit: Unit, index: int, args: tuple, kwargs: dict[str, Any]) -> None:
        assert self.observer is not None
        self.observer.start_call(index, self.calls)
        if self._direct:
            self.observer.observe(unit.name, args[0] if args else kwargs["input"])

    def end_unit(self, unit: Unit) -> None:
        assert self.observer is not None
        self.observer.remove()
        self.build(unit.layers)
        self.observer = None

    def whole_model(
        self, model: nn.Module, calls: list[dict[str, Any]], *, progress: bool, on_progress: ProgressFn | None
    ) -> None:
        """The statistics of every layer from one hooked pass, then every layer built (the reference)."""
        self.observer = self._observer(list(self.targets), hooks=True)

        def on_call(i: int) -> None:
            assert self.observer is not None
            self.observer.start_call(i, len(calls))
            if on_progress:
                on_progress("calibrate", i, len(calls))

        run_calls(model, calls, progress=progress, on_call=on_call)
        self.observer.remove()
        self.build(list(self.targets), progress=progress, on_progress=on_progress)
        self.observer = None

    def build(self, names: Sequence[str], *, progress: bool = False, on_progress: ProgressFn | None = None) -> None:
        assert self.observer is not None
        stats = self.observer.stats
        for i, name in enumerate(tqdm(names, desc=f"quantizing ({self.result.recipe.name})", disable=not progress)):
            if stats[name].count:
                lin = self.targets[name]
                layer, report = build_seglinear(name, lin, self.specs[name], stats[name])
                self.new_layers[name] = layer.to(lin.weight.device)
                self.result.layers[name] = report
                self.result.float_bytes += _module_bytes(lin)
                self.result.quantized_bytes += layer.weight_nbytes()
            del stats[name]  # frees its rows and (once no other layer shares it) its Hessian
            if on_progress:
                on_progress("build", i + 1, len(names))

    def close(self) -> None:
        if self.observer is not None:
            self.observer.remove()
            self.observer = None


__all__ = ["ProgressFn", "QuantizationResult", "kept_weights_sha256", "quantize", "validate_plan"]
