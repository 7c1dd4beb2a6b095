"""``GET /models``: every model × variant with its state, size, latency, memory and fidelity; and
``POST /models/{model}/variants/{variant}/build``, which starts a background build on a worker serving it.

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
from fastapi.responses import JSONResponse

from service.api.deps import StateDep
from service.api.errors import ApiError
from service.api.job_service import percentile
from service.api.schemas import AdapterPublic, BuildAccepted, LatencyPublic, ModelPublic, ModelsPublic, VariantPublic
from service.api.variant_state import build_route, reports, variant_status
from service.build_requests import build_requests_for
from service.jobs.queue import QueueUnavailableError, StatsRecord, WorkerInfo
from service.registry import UnknownModelError, VariantKey, VariantSpec

router = APIRouter(tags=["models"])
logger = logging.getLogger(__name__)


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
        context = {
            k: data[k]
            for k in ("seeds", "num_inference_steps", "guidance_scale", "eval_prompt_count", "calibration_samples")
            if k in data
        }
        return {**entry, "report": str(path), **context}
    return data if isinstance(data, dict) else None


def _calibration(spec: VariantSpec) -> dict[str, Any]:
    """The conditions a missing artifact is calibrated at (the registry's, filled with the serving defaults)."""
    return spec.calibration.model_dump(
        mode="json", include={"height", "width", "num_inference_steps", "guidance_scale", "samples", "steps_per_prompt"}
    )


def _latency(records: list[StatsRecord]) -> LatencyPublic:
    inf = [r.inference_s for r in records]
    tot = [r.total_s for r in records]
    return LatencyPublic(
        samples=len(records),
        inference_p50_s=percentile(inf, 50),
        inference_p95_s=percentile(inf, 95),
        total_p50_s=percentile(tot, 50),
        total_p95_s=percentile(tot, 95),
    )


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
            served = reports(workers, key)
            merged = variant_status(registry, settings.cache_dir, workers, key)
            artifact = registry.artifact_dir(key, settings.cache_dir) if spec.quantized else None
            try:
                records = await queue.stats(key)
            except QueueUnavailableError:
                records = []
            variants.append(
                VariantPublic(
                    name=spec.name,
                    recipe=spec.recipe,
                    state=merged.state,
                    reason=merged.reason,
                    precision=merged.precision or None,
                    device=merged.device or None,
                    weight_bytes=merged.weight_bytes,
                    peak_memory_bytes=merged.peak_memory_bytes,
                    memory_kind=merged.memory_kind,
                    load_seconds=merged.load_seconds,
                    compile_s=merged.compile_s,
                    latency=_latency(records),
                    progress=merged.progress,
                    shared_bytes=merged.shared_bytes,
                    fidelity=_fidelity(registry.eval_report_path(key, settings.cache_dir), (spec.name, spec.recipe)),
                    artifact=str(artifact) if artifact else None,
                    calibration=_calibration(spec) if spec.quantized else None,
                    workers_loaded=sum(1 for r in served if r.state == "loaded"),
                )
            )
        out.append(
            ModelPublic(
                name=model.name,
                source=model.source,
                description=model.description,
                default_variant=model.default_variant or model.variants[0].name,
                sizes=model.size_rule,
                defaults=model.defaults,
                components=model.components(),
                drop_components=model.drop_components,
                variants=variants,
                adapters=[AdapterPublic(**a.public()) for a in model.adapters],
            )
        )
    return ModelsPublic(data=out)


@router.post(
    "/models/{model}/variants/{variant}/build",
    status_code=202,
    response_model=BuildAccepted,
    summary="Build a variant's artifact in the background",
    responses={
        200: {"model": BuildAccepted, "description": "already built (or building): nothing new"},
        404: {"description": "unknown model or variant"},
        409: {"description": "the variant needs no build (it runs the source weights)"},
    },
)
async def build_variant(model: str, variant: str, state: StateDep) -> JSONResponse:
    """Ask the workers that serve the variant to build it; follow ``state`` and ``progress`` in ``GET /models``."""
    registry, settings = state.registry, state.settings
    try:
        spec = registry.model(model).variant(variant)
    except UnknownModelError as e:
        raise ApiError(404, str(e), code=f"unknown_{e.what}", param=e.what, extra={"valid": e.valid}) from None
    key = VariantKey(model, spec.name)
    if not spec.quantized:
        raise ApiError(
            409,
            f"variant {key} runs the source weights (recipe {spec.recipe!r}); there is nothing to build",
            code="nothing_to_build",
        )
    try:
        workers: list[WorkerInfo] = await state.queue.workers()
    except QueueUnavailableError as e:
        raise ApiError(
            503, f"the job queue is unavailable: {e}", code="queue_unavailable", headers={"Retry-After": "5"}
        ) from None
    current = variant_status(registry, settings.cache_dir, workers, key)
    serving = sum(1 for w in workers if str(key) in w.variants and w.state != "draining")
    if current.state in ("available", "loaded", "building"):
        body = BuildAccepted(
            model=model,
            variant=spec.name,
            state=current.state,
            progress=current.progress,
            workers=serving,
            message=f"variant {key} is already {current.state}",
        )
        return JSONResponse(body.model_dump(mode="json"), status_code=200)
    try:
        await build_requests_for(state.queue).request(key)
    except QueueUnavailableError as e:
        raise ApiError(
            503, f"the job queue is unavailable: {e}", code="queue_unavailable", headers={"Retry-After": "5"}
        ) from None
    message = (
        f"build of {key} requested; GET /models shows its progress"
        if serving
        else f"build of {key} requested; no live worker serves this variant yet, the first one to start builds it"
    )
    logger.info("%s (%s)", message, build_route(key))
    body = BuildAccepted(
        model=model,
        variant=spec.name,
        state="building" if serving else current.state,
        progress=None,
        workers=serving,
        message=message,
    )
    return JSONResponse(body.model_dump(mode="json"), status_code=202, headers={"Location": "/models"})
