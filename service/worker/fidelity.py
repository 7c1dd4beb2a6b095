"""Fidelity recorded at build time: a fresh artifact against ``fp`` on a few held-out prompts → ``eval.json``.

A user choosing a variant should see what it costs in quality next to what it saves, without running
``segquant eval`` by hand. This wraps :func:`segquant_core.eval.evaluate` (same noise for both, PSNR, SSIM,
final-latent MSE, and adherence where the pipeline offers a scorer) and writes its report next to the
artifact, in the ``segquant eval`` ``report.json`` shape that ``GET /models`` already reads.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from segquant_core.eval import evaluate

logger = logging.getLogger(__name__)


def eval_prompts(pipe: Any, count: int, prompts_file: Path | None) -> list[str]:
    """``count`` evaluation prompts: the configured file, else the pipeline's held-out split, else the
    engine's general evaluation set."""
    if prompts_file is not None:
        lines = [line.strip() for line in prompts_file.expanduser().read_text().splitlines() if line.strip()]
        if not lines:
            raise ValueError(f"evaluation prompts file {prompts_file} is empty")
        return lines[:count]
    own = getattr(pipe, "default_eval_prompts", None)
    if callable(own):
        return list(own(count))[:count]
    from segquant_core.prompts import choose_prompts

    return list(choose_prompts(pipe, count, purpose="evaluation"))[:count]


def _finite(value: Any) -> Any:
    """JSON has no NaN or infinity (identical images have infinite PSNR): such values become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def evaluate_artifact(
    load_float_pipeline: Callable[[], Any],
    artifact: Path,
    recipe: str,
    *,
    prompts: Sequence[str],
    calibration_prompts: Sequence[str],
    seeds: Sequence[int],
    num_inference_steps: int,
    guidance_scale: float,
    scorer: Any = None,
    call_kwargs: dict[str, Any] | None = None,
    out: Path | None = None,
) -> dict[str, Any]:
    """Score the artifact in ``artifact`` (built with ``recipe``) against ``fp``; write and return the report.

    ``load_float_pipeline`` is called twice (``fp``, then the variant, into which the artifact is loaded).
    """
    with tempfile.TemporaryDirectory(prefix="segquant-eval-") as tmp:
        # evaluate() loads a prebuilt variant from <artifacts_dir>/<recipe>: point that name at the artifact.
        os.symlink(artifact.resolve(), Path(tmp) / recipe.replace(":", "_"))
        report = evaluate(
            load_float_pipeline,
            [recipe],
            list(prompts),
            list(seeds),
            calibration_prompts=list(calibration_prompts),
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            scorer=scorer if callable(scorer) else None,
            artifacts_dir=tmp,
            call_kwargs=call_kwargs,
            progress=False,
        )
    data = _finite(report.to_dict())
    data["variants"] = [v for v in data["variants"] if v.get("variant") != "fp"]  # fp against itself: no news
    data["artifact"] = str(artifact)
    write_json(out or artifact / "eval.json", data)
    return data


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write atomically (a reader never sees half a report)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, allow_nan=False))
    os.replace(tmp, path)


def psnr_of(report: dict[str, Any] | None) -> float | None:
    """The variant's PSNR (dB) from a report written by :func:`evaluate_artifact` (or its flat form)."""
    if not isinstance(report, dict):
        return None
    if isinstance(report.get("variants"), list):
        entries = [v for v in report["variants"] if isinstance(v, dict) and v.get("variant") != "fp"]
        report = entries[0] if entries else {}
    value = report.get("psnr")
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None
