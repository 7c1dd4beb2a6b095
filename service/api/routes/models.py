"""``GET /models``: every model × variant with its state, size, latency, memory and fidelity.

State and measurements come from the live workers' advertisements (merged: a variant is ``loaded`` if any
worker holds it); without a live worker the artifact folder decides between ``available`` and
``not_built``. Fidelity is the variant's ``eval.json`` (next to the artifact, or the configured path): either
the variant's own figures, or a ``segquant eval`` ``report.json`` from which this variant's entry is taken.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from fastapi import APIRouter

from service.api.deps import StateDep
from service.api.job_service import percentile
from service.api.schemas import LatencyPublic, ModelPublic, ModelsPublic, VariantPublic
from service.jobs.queue import QueueUnavailableError, StatsRecord, VariantStatus, WorkerInfo
from service.registry import VariantKey, VariantSpec

router = APIRouter(tags=["models"])
logger = logging.getLogger(__name__)

_RANK = {"loaded": 4, "building": 3, "available": 2, "not_built": 1, "failed": 0}


def _merge(statuses: list[VariantStatus]) -> VariantStatus | None:
    if not statuses:
        return None
    best = max(statuses, key=lambda s: _RANK[s.state]).model_copy()
    peaks = [s.peak_memory_bytes for s in statuses if s.peak_memory_bytes]
    best.peak_memory_bytes = max(peaks) if peaks else None
    best.weight_bytes = best.weight_bytes or next((s.weight_bytes for s in statuses if s.weight_bytes), None)
    return best


def _fidelity(path: Path, names: tuple[str, ...]) -> dict[str, Any] | None:
    """A variant's figures: the file itself, or its entry of a ``segquant eval`` report (``variants`` list)."""
    try:
        data = json.loads(path.read_text()) if path.is_file() else None
    except (OSError, json.JSONDecodeError) as e:
        logger.warning("unreadable eval report %s: %s", path, e)
        return {"error": f"unreadable eval report: {e}"}
    if isinstance(data, dict) and isinstance(data.get("variants"), list):
        entry = next((v for v in data["variants"] if isinstance(v, dict) and v.get("variant") in names), None)
        if entry is None:
            return None
        context = {k: data[k] for k in ("seeds", "num_inference_steps", "guidance_scale", "eval_prompt_count",
                                        "calibration_samples") if k in data}
        return {**entry, "report": str(path), **context}
    return data if isinstance(data, dict) else None


def _calibration(spec: VariantSpec) -> dict[str, Any]:
    """The conditions a missing artifact is calibrated at (the registry's, filled with the serving defaults)."""
    return spec.calibration.model_dump(mode="json", include={"height", "width", "num_inference_steps",
                                                            "guidance_scale", "samples", "steps_per_prompt"})


def _latency(records: list[StatsRecord]) -> LatencyPublic:
    inf = [r.inference_s for r in records]
    tot = [r.total_s for r in records]
    return LatencyPublic(samples=len(records), inference_p50_s=percentile(inf, 50),
                         inference_p95_s=percentile(inf, 95), total_p50_s=percentile(tot, 50),
                         total_p95_s=percentile(tot, 95))


@router.get("/models", response_model=ModelsPublic, summary="Models and their variants")
async def list_models(state: StateDep) -> ModelsPublic:
    registry, settings, queue = state.registry, state.settings, state.queue
    try:
        workers: list[WorkerInfo] = await queue.workers()
    except QueueUnavailableError:
        workers = []
    out: list[ModelPublic] = []
    for model in registry.models.values():
        variants: list[VariantPublic] = []
        for spec in model.variants:
            key = VariantKey(model.name, spec.name)
            reports = [w.variants[str(key)] for w in workers if str(key) in w.variants]
            merged = _merge(reports)
            artifact = registry.artifact_dir(key, settings.cache_dir) if spec.quantized else None
            if merged is None:
                built = artifact is None or (artifact / "manifest.json").is_file()
                merged = VariantStatus(state="available" if built else "not_built", recipe=spec.recipe)
            try:
                records = await queue.stats(key)
            except QueueUnavailableError:
                records = []
            variants.append(VariantPublic(
                name=spec.name, recipe=spec.recipe, state=merged.state, reason=merged.reason,
                precision=merged.precision or None, device=merged.device or None, weight_bytes=merged.weight_bytes,
                peak_memory_bytes=merged.peak_memory_bytes, memory_kind=merged.memory_kind,
                load_seconds=merged.load_seconds, latency=_latency(records),
                fidelity=_fidelity(registry.eval_report_path(key, settings.cache_dir), (spec.name, spec.recipe)),
                artifact=str(artifact) if artifact else None,
                calibration=_calibration(spec) if spec.quantized else None,
                workers_loaded=sum(1 for r in reports if r.state == "loaded")))
        out.append(ModelPublic(name=model.name, source=model.source, description=model.description,
                               default_variant=model.default_variant or model.variants[0].name,
                               sizes=model.size_rule, defaults=model.defaults, components=model.components(),
                               drop_components=model.drop_components, variants=variants))
    return ModelsPublic(data=out)
