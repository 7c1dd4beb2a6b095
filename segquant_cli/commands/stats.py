"""``segquant stats MODEL_DIR``: the activation statistics that explain a model's ablation ladder.

Records denoiser calls from the model's own pipeline on its calibration prompts (as ``segquant eval``
does), runs them through the float denoiser, and prints per-chunk AdaLN ranges, negative tails of DualScale
inputs (per segment for ragged inputs) and per-head ranges of attention outputs.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from segquant_cli.errors import CLIError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "stats",
        help="activation statistics that explain the ladder (AdaLN chunks, GELU/SiLU tails, per-head ranges)",
        description="Capture calibration calls from the pipeline's own loop and measure the float denoiser.",
    )
    p.add_argument("model_dir", help="diffusers pipeline directory, or shipped:mmdit / shipped:unet / shipped:flux")
    p.add_argument("--calib-samples", type=int, default=64, help="denoiser calls to measure on (default 64)")
    p.add_argument("--steps-per-prompt", type=int, default=4)
    p.add_argument("--steps", type=int, default=20, help="denoising steps of the recorded runs (default 20)")
    p.add_argument("--guidance", type=float, default=3.0, help="guidance scale (default 3.0, as the service)")
    p.add_argument("--height", type=int, help="image height (default: the size the service serves)")
    p.add_argument("--width", type=int, help="image width (default: the size the service serves)")
    p.add_argument("--json", dest="json_out", help="also write every layer's figures to this JSON file")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import segquant_core as sq
    from segquant_cli.commands.quantize import calibration_size
    from segquant_cli.models import load_pipeline
    from segquant_core.calibrate.capture import denoiser_of
    from segquant_core.detect import example_inputs_for
    from segquant_core.eval.activation_stats import collect_activation_stats, format_stats
    from segquant_core.prompts import choose_prompts

    if args.calib_samples < 1 or args.steps < 1:
        raise CLIError("--calib-samples and --steps must be ≥ 1")
    pipe = load_pipeline(args.model_dir)
    size = calibration_size(args.model_dir, args.height, args.width, pipe)
    prompts = choose_prompts(
        pipe, math.ceil(args.calib_samples / args.steps_per_prompt), log=lambda line: print(f"segquant: {line}")
    )
    calibration = sq.capture_calibration(
        pipe,
        prompts,
        num_inference_steps=args.steps,
        steps_per_prompt=args.steps_per_prompt,
        guidance_scale=args.guidance,
        call_kwargs=size,
    )
    model = denoiser_of(pipe)
    plan = sq.detect(model, example_inputs_for(model))
    stats = collect_activation_stats(model, plan, calibration.calls)
    print(format_stats(stats))
    if args.json_out:
        out = Path(args.json_out)
        out.parent.mkdir(parents=True, exist_ok=True)
        record = {"model": str(args.model_dir), "calibration": calibration.describe(), **stats.to_dict()}
        out.write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote {out}")
    return 0
