"""``evaluate``: the float model and each quantized variant on the same prompts, seeds and noise.

Each variant starts from a freshly loaded float pipeline, is calibrated on *calibration* prompts (which
must not overlap the evaluation prompts; their denoiser inputs are captured once, from the float
pipeline, and shared by every variant), generates the evaluation grid, and is scored against the float
images: PSNR, SSIM, final-latent MSE and — when a scorer is given — prompt-adherence accuracy. Once scored,
a variant's images shrink to the thumbnails the grid shows (the float images once every variant is done), so
memory stays bounded at 1024² and beyond.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from segquant_core.api import CalibrationSet, capture_calibration, load_into_pipeline, quantize_pipeline, save
from segquant_core.calibrate.capture import denoiser_of
from segquant_core.eval.grid import MAX_ROWS, cell_size, fit
from segquant_core.eval.harness import Generations, generate_grid
from segquant_core.eval.metrics import latent_mse, mean_finite, psnr, ssim
from segquant_core.recipes import recipe

logger = logging.getLogger(__name__)

Scorer = Callable[[Image.Image, str], dict[str, bool]]


@dataclass
class VariantResult:
    variant: str
    psnr: float
    ssim: float
    latent_mse: float
    adherence: dict[str, float] | None
    seconds_per_image: float
    quantize_seconds: float
    weight_bytes: int | None
    float_weight_bytes: int | None
    summary: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class EvalReport:
    model: str
    variants: list[VariantResult]
    eval_prompts: list[str]
    calibration_prompts: list[str]
    seeds: list[int]
    num_inference_steps: int
    guidance_scale: float
    calibration_samples: int
    generations: dict[str, Generations] = field(default_factory=dict, repr=False)
    height: int | None = None  # None: the pipeline's default size
    width: int | None = None
    unscored_prompts: list[str] = field(default_factory=list)  # prompts the adherence scorer cannot read

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "eval_prompt_count": len(self.eval_prompts),
            "calibration_prompt_count": len(self.calibration_prompts),
            "calibration_samples": self.calibration_samples,
            "seeds": self.seeds,
            "num_inference_steps": self.num_inference_steps,
            "guidance_scale": self.guidance_scale,
            "height": self.height,
            "width": self.width,
            "eval_prompts": self.eval_prompts,
            "unscored_prompts": self.unscored_prompts,
            "variants": [v.to_dict() for v in self.variants],
        }


def _adherence(gen: Generations, scorer: Scorer) -> tuple[dict[str, float], list[str]]:
    """Mean per-attribute adherence over the prompts the scorer can read, and the prompts it cannot.

    A scorer raises ``ValueError`` for a prompt it cannot parse (the shapes analyser needs a background,
    and a colour, size and position per shape): such prompts are left unscored instead of stopping the
    evaluation; PSNR, SSIM and latent MSE still cover them.
    """
    totals: dict[str, list[bool]] = {}
    unscored: set[int] = set()
    for (pi, _seed), image in gen.images.items():
        if pi in unscored:
            continue
        try:
            verdict = scorer(image, gen.prompts[pi])
        except ValueError:
            unscored.add(pi)
            continue
        for key, ok in verdict.items():
            totals.setdefault(key, []).append(bool(ok))
    return {k: sum(v) / len(v) for k, v in sorted(totals.items())}, [gen.prompts[i] for i in sorted(unscored)]


def shrink_to_grid(gen: Generations, columns: int) -> None:
    """Keep only the images the grid shows (first seed, first rows), at the grid's cell size."""
    rows = min(len(gen.prompts), MAX_ROWS)
    shown = {(ri, gen.seeds[0]) for ri in range(rows)}
    for key in [k for k in gen.images if k not in shown]:
        del gen.images[key]
    for key, image in gen.images.items():
        gen.images[key] = fit(image, cell_size(image.width, image.height, columns, rows))


def evaluate(
    load_pipeline: Callable[[], Any],
    variants: Sequence[str],
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    calibration_prompts: Sequence[str],
    model_name: str = "model",
    num_inference_steps: int = 20,
    guidance_scale: float = 3.0,
    steps_per_prompt: int = 4,
    scorer: Scorer | None = None,
    artifacts_dir: str | Path | None = None,
    call_kwargs: dict[str, Any] | None = None,
    progress: bool = True,
    after_build: Callable[[Any, str], None] | None = None,
) -> EvalReport:
    """Run every variant (``fp`` first, added if missing) and score it against ``fp``.

    ``after_build(pipe, variant)`` runs on each variant's pipeline once it is quantized (or loaded), before it
    generates: e.g. attaching the same LoRA adapter to every variant (calibration never sees the adapter).
    """
    if not prompts or not seeds:
        raise ValueError("evaluation needs at least one prompt and one seed")
    overlap = set(prompts) & set(calibration_prompts)
    if overlap:
        raise ValueError(
            f"{len(overlap)} evaluation prompts are also calibration prompts "
            f"(e.g. {sorted(overlap)[0]!r}); they must be disjoint"
        )
    names = ["fp", *[v for v in variants if v != "fp"]]
    for name in names:
        recipe(name)  # validate every name before spending minutes on the first
    size = call_kwargs or {}
    report = EvalReport(
        model_name,
        [],
        list(prompts),
        list(calibration_prompts),
        list(seeds),
        num_inference_steps,
        guidance_scale,
        0,
        height=size.get("height"),
        width=size.get("width"),
    )
    calibration: CalibrationSet | None = None  # captured once from the float pipeline, shared by all variants
    for name in names:
        pipe = load_pipeline()
        t0 = time.perf_counter()
        summary: dict[str, Any] = {}
        if name != "fp":
            cached = Path(artifacts_dir) / name.replace(":", "_") if artifacts_dir else None
            if cached is not None and (cached / "manifest.json").is_file():
                result = load_into_pipeline(cached, pipe)
                logger.info("eval: loaded %s from %s", name, cached)
            else:
                if calibration is None:
                    calibration = capture_calibration(
                        pipe,
                        calibration_prompts,
                        num_inference_steps=num_inference_steps,
                        steps_per_prompt=steps_per_prompt,
                        guidance_scale=guidance_scale,
                        call_kwargs=call_kwargs,
                        progress=progress,
                    )
                result = quantize_pipeline(
                    pipe,
                    name,
                    calibration_prompts,
                    num_inference_steps=num_inference_steps,
                    steps_per_prompt=steps_per_prompt,
                    guidance_scale=guidance_scale,
                    progress=progress,
                    call_kwargs=call_kwargs,
                    calibration=calibration,
                )
                report.calibration_samples = int(result.calibration.get("samples", 0))
                if cached is not None:
                    save(denoiser_of(pipe), cached)
            summary = result.summary()
        quant_s = time.perf_counter() - t0
        if after_build is not None:
            after_build(pipe, name)
        gen = generate_grid(
            pipe,
            prompts,
            seeds,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            call_kwargs=call_kwargs,
            desc=f"generating [{name}]",
            progress=progress,
        )
        report.generations[name] = gen
        ref = report.generations["fp"]
        keys = sorted(gen.images)
        p = [psnr(ref.images[k], gen.images[k]) for k in keys]
        s = [ssim(ref.images[k], gen.images[k]) for k in keys]
        lat = [latent_mse(ref.latents[k], gen.latents[k]) for k in keys if k in gen.latents and k in ref.latents]
        adherence = None
        if scorer:
            adherence, unscored = _adherence(gen, scorer)
            if unscored and not report.unscored_prompts:
                logger.warning(
                    "adherence not scored for %d of %d prompts the scorer cannot read (e.g. %r)",
                    len(unscored),
                    len(gen.prompts),
                    unscored[0],
                )
            report.unscored_prompts = unscored
        report.variants.append(
            VariantResult(
                variant=name,
                psnr=mean_finite(p),
                ssim=sum(s) / len(s),
                latent_mse=sum(lat) / len(lat) if lat else float("nan"),
                adherence=adherence,
                seconds_per_image=gen.seconds / max(gen.count, 1),
                quantize_seconds=quant_s if name != "fp" else 0.0,
                weight_bytes=summary.get("quantized_bytes"),
                float_weight_bytes=summary.get("float_bytes"),
                summary=summary,
            )
        )
        if name != "fp":
            shrink_to_grid(gen, len(names))
        del pipe
    shrink_to_grid(report.generations["fp"], len(names))
    return report
