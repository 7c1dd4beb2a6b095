"""``segquant quantize MODEL_DIR --recipe NAME --out DIR``: calibrate, quantize, write an artifact."""

from __future__ import annotations

import argparse
import inspect
import json
import math
from pathlib import Path
from typing import Any

from segquant_cli.errors import CLIError
from segquant_cli.models import DENOISER_COMPONENTS, load_denoiser


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "quantize",
        help="quantize a denoiser with a recipe and write an artifact",
        description="Calibrate on the pipeline's own denoising loop, quantize, save.",
    )
    p.add_argument("model_dir", help="diffusers pipeline directory (or model directory / hub id)")
    p.add_argument("--recipe", required=True, help="recipe name with optional switches, e.g. w8a8-segquant:dual=off")
    p.add_argument("--out", required=True, help="artifact directory to write")
    p.add_argument("--component", choices=["transformer", "unet"])
    p.add_argument("--prompts", help="text file with one calibration prompt per line")
    p.add_argument(
        "--calib-samples",
        type=int,
        default=256,
        help="denoiser calls to calibrate on (default 256: per-segment static scales need the coverage)",
    )
    p.add_argument("--steps", type=int, default=20, help="denoising steps per calibration prompt (default 20)")
    p.add_argument("--steps-per-prompt", type=int, default=4, help="recorded steps per prompt (default 4)")
    p.add_argument(
        "--guidance-scale",
        "--guidance",
        type=float,
        default=None,
        help="guidance while calibrating (default: the pipeline's own default)",
    )
    p.add_argument("--height", type=int, help="image height to calibrate at (default: the model's default size)")
    p.add_argument("--width", type=int, help="image width to calibrate at (default: the model's default size)")
    p.add_argument(
        "--drop-components",
        default="",
        help="comma-separated optional components to load as None, e.g. text_encoder_3 (SD3 without T5)",
    )
    p.add_argument("--overrides", help='JSON file: {"excludes": [globs], "overrides": [{"pattern": …}]}')
    p.add_argument("--plan", help="JSON plan file (as printed by `segquant plan --json`), possibly edited")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", default="auto")
    p.add_argument(
        "--eval-prompts",
        type=int,
        default=8,
        help="after saving, score the artifact against fp on this many held-out prompts (1 seed, at "
        "--steps) and write eval.json next to it; 0 = skip (default 8)",
    )
    p.set_defaults(run=run)


def _read_prompts(path: str | None) -> list[str] | None:
    if not path:
        return None
    p = Path(path)
    if not p.is_file():
        raise CLIError(f"--prompts: {path}: no such file")
    prompts = [line.strip() for line in p.read_text().splitlines() if line.strip()]
    if not prompts:
        raise CLIError(f"--prompts: {path} has no prompts")
    return prompts


def calibration_size(model_dir: str, height: int | None, width: int | None, pipe: Any = None) -> dict[str, Any]:
    """Pipeline-call arguments for the size to run at: the flags, else the size the service serves by default.

    Pipelines that bin sizes (PixArt) are told not to, so the size asked for is the size rendered.
    """
    for flag, value in (("--height", height), ("--width", width)):
        if value is not None and value < 1:
            raise CLIError(f"{flag} must be ≥ 1")
    if height is None or width is None:
        from service.registry import derive_size_rule

        default = derive_size_rule(str(model_dir)).default
        height, width = height or default, width or default
    out: dict[str, Any] = {"height": height, "width": width}
    if pipe is not None and "use_resolution_binning" in inspect.signature(type(pipe).__call__).parameters:
        out["use_resolution_binning"] = False
    return out


def drop_list(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(",") if name.strip())


def denoiser_component(pipe: Any, model: Any, given: str | None) -> str:
    """The pipeline attribute that holds ``model`` (``transformer`` for a bare DiT folder, never a guess)."""
    if given:
        return given
    for name in DENOISER_COMPONENTS:
        if pipe is not None and getattr(pipe, name, None) is model:
            return name
    return "unet" if type(model).__name__.startswith("UNet") else "transformer"


def _apply_overrides(recipe: Any, path: str | None) -> Any:
    if not path:
        return recipe
    from segquant_core.recipes import LayerOverride

    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CLIError(f"--overrides: {path}: no such file") from None
    except json.JSONDecodeError as e:
        raise CLIError(f"--overrides: {path}: invalid JSON ({e})") from None
    if not isinstance(data, dict) or set(data) - {"excludes", "overrides"}:
        raise CLIError("--overrides: expected a JSON object with 'excludes' and/or 'overrides'")
    return recipe.with_switches(
        excludes=tuple(recipe.excludes) + tuple(data.get("excludes", [])),
        overrides=tuple(recipe.overrides) + tuple(LayerOverride.from_dict(o) for o in data.get("overrides", [])),
    )


def run(args: argparse.Namespace) -> int:
    import segquant_core as sq
    from segquant_core.detect import example_inputs_for

    if args.calib_samples < 1:
        raise CLIError("--calib-samples must be ≥ 1")
    if args.eval_prompts < 0:
        raise CLIError("--eval-prompts must be ≥ 0 (0 skips the evaluation)")
    if not 1 <= args.steps_per_prompt <= args.steps:
        raise CLIError(f"--steps-per-prompt must be between 1 and --steps ({args.steps})")
    recipe = _apply_overrides(sq.recipe(args.recipe), args.overrides)
    plan = sq.Plan.load(args.plan) if args.plan else None
    model, pipe = load_denoiser(args.model_dir, args.component, drop_list(args.drop_components))
    if pipe is not None:
        from segquant_core.prompts import choose_prompts

        n_prompts = math.ceil(args.calib_samples / args.steps_per_prompt)
        prompts = choose_prompts(
            pipe, n_prompts, given=_read_prompts(args.prompts), log=lambda line: print(f"segquant: {line}")
        )
        size = calibration_size(args.model_dir, args.height, args.width, pipe)
        calib = sq.capture_calibration(
            pipe,
            prompts,
            num_inference_steps=args.steps,
            steps_per_prompt=args.steps_per_prompt,
            call_kwargs=size,
            guidance_scale=args.guidance_scale,
            seed=args.seed,
        )
    else:
        print("segquant: warning: no pipeline around this model; calibrating on random example inputs")
        calib = sq.CalibrationSet(calls=[example_inputs_for(model) for _ in range(args.calib_samples)])
    result = sq.quantize(model, recipe, calib, plan, backend=args.backend, seed=args.seed)
    source = {
        "path": str(Path(args.model_dir).resolve()) if Path(args.model_dir).exists() else args.model_dir,
        "component": denoiser_component(pipe, model, args.component),
    }
    if args.drop_components:
        source["drop_components"] = list(drop_list(args.drop_components))
    sq.save(model, args.out, source=source)
    _print_summary(result.summary(), args.out)
    if pipe is not None and args.eval_prompts > 0:
        _write_fidelity(args, pipe, prompts, size)
    return 0


def _write_fidelity(args: argparse.Namespace, pipe: Any, calibration: list[str], size: dict[str, Any] | None) -> None:
    """eval.json next to the artifact, as the service writes after a build (GET /models reads it)."""
    from segquant_cli.models import load_pipeline
    from service.worker.fidelity import eval_prompts, evaluate_artifact

    drop = drop_list(args.drop_components)
    prompts = [p for p in eval_prompts(pipe, args.eval_prompts, None) if p not in set(calibration)]
    if not prompts:
        print("segquant: warning: no evaluation prompts disjoint from the calibration prompts; eval.json not written")
        return
    guidance = args.guidance_scale if args.guidance_scale is not None else 3.0
    data = evaluate_artifact(
        lambda: load_pipeline(args.model_dir, drop),
        Path(args.out),
        args.recipe,
        prompts=prompts,
        calibration_prompts=calibration,
        seeds=[0],
        num_inference_steps=args.steps,
        guidance_scale=guidance,
        scorer=getattr(pipe, "adherence_scorer", None),
        call_kwargs=size,
    )
    entry = data["variants"][0]
    print(
        f"segquant: fidelity against fp on {len(prompts)} prompts: PSNR {entry['psnr']} dB, SSIM "
        f"{entry['ssim']}; written to {Path(args.out) / 'eval.json'}"
    )


def _print_summary(s: dict[str, Any], out: str) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"segquant quantize — {s['recipe']}", show_header=False)
    table.add_row("quantized linears", str(s["quantized_layers"]))
    table.add_row("kept in float", str(s["excluded_layers"]))
    for fmt, n in sorted(s["formats"].items()):
        table.add_row(f"  {fmt}", str(n))
    table.add_row("segmented layers", str(s["segmented_layers"]))
    table.add_row("dual-scale layers", str(s["dual_scale_layers"]))
    fb, qb = s["float_bytes"], s["quantized_bytes"]
    ratio = f" ({qb / fb:.3f}×)" if fb else ""
    table.add_row("weight bytes", f"{fb:,} → {qb:,}{ratio}")
    table.add_row("backends", ", ".join(f"{k}: {v}" for k, v in s["backends"].items()) or "—")
    table.add_row("time", f"{s['seconds']} s")
    table.add_row("artifact", out)
    console.print(table)
