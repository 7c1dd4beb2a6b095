"""``segquant eval MODEL_DIR --variants …``: fidelity of quantized variants against the float model."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from segquant_cli.commands.quantize import calibration_size, drop_list
from segquant_cli.errors import CLIError
from segquant_cli.lora_choice import parse_lora
from segquant_cli.models import load_pipeline


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="compare quantized variants with the float model (PSNR, SSIM, adherence)",
        description="Generate with fp and each variant from the same noise and seeds, then report.",
    )
    p.add_argument("model_dir", help="diffusers pipeline directory, or shipped:mmdit / shipped:unet")
    p.add_argument(
        "--variants",
        default="fp,w8a8,w8a8-smooth,w8a8-segquant",
        help="comma-separated recipe names (switches allowed, e.g. w8a8-segquant:dual=off)",
    )
    p.add_argument("--prompts", help="evaluation prompts, one per line (default: the model's held-out prompts)")
    p.add_argument("--num-prompts", type=int, default=32, help="how many default evaluation prompts (default 32)")
    p.add_argument("--calib-prompts", help="calibration prompts file (default: the model's calibration prompts)")
    p.add_argument(
        "--calib-samples",
        type=int,
        default=256,
        help="denoiser calls to calibrate on (default 256: per-segment static scales need the coverage)",
    )
    p.add_argument("--steps-per-prompt", type=int, default=4)
    p.add_argument("--seeds", default="0,1", help="comma-separated seeds (default 0,1)")
    p.add_argument("--steps", type=int, default=20, help="denoising steps (default 20)")
    p.add_argument("--guidance", type=float, default=3.0, help="guidance scale (default 3.0, as the service)")
    p.add_argument("--height", type=int, help="image height (default: the model's default size)")
    p.add_argument("--width", type=int, help="image width (default: the model's default size)")
    p.add_argument(
        "--drop-components", default="", help="comma-separated optional components to load as None, e.g. text_encoder_3"
    )
    p.add_argument("--artifacts", help="cache quantized variants here and reuse them")
    p.add_argument(
        "--lora",
        help="NAME[:SCALE]: attach this adapter to every variant after quantizing (file, "
        "directory, or a name under the model's loras/); its eval_prompts.txt is the default prompts",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile every variant's denoiser, fp included (same images up to float rounding)",
    )
    p.add_argument("--out", required=True, help="report directory (report.json, report.md, grid.png)")
    p.set_defaults(run=run)


def _lines(path: str) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise CLIError(f"{path}: no such file")
    out = [line.strip() for line in p.read_text().splitlines() if line.strip()]
    if not out:
        raise CLIError(f"{path}: no prompts in it")
    return out


def _after_build(attach: Any, compiled: bool) -> Any:
    """What runs on each variant's pipeline before it generates: the adapter, then compilation."""
    if not compiled:
        return attach

    def build(pipe: Any, variant: str) -> None:
        from segquant_core.calibrate.capture import denoiser_of
        from segquant_core.compile import compile_denoiser

        if attach is not None:
            attach(pipe, variant)
        compile_denoiser(denoiser_of(pipe))

    return build


def run(args: argparse.Namespace) -> int:
    import math

    from segquant_core.eval import evaluate, write_report

    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise CLIError(f"--seeds must be comma-separated integers, got {args.seeds!r}") from None
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if not variants or not seeds:
        raise CLIError("--variants and --seeds must not be empty")
    if args.calib_samples < 1 or args.steps < 1:
        raise CLIError("--calib-samples and --steps must be ≥ 1")
    if args.num_prompts < 1:
        raise CLIError("--num-prompts must be ≥ 1")
    from segquant_core.prompts import choose_prompts

    lora = parse_lora(args.lora, str(args.model_dir)) if args.lora else None
    drop = drop_list(args.drop_components)
    pipe = load_pipeline(args.model_dir, drop)
    size = calibration_size(args.model_dir, args.height, args.width, pipe)

    def say(line: str) -> None:
        print(f"segquant: {line}")

    given = _lines(args.prompts) if args.prompts else (lora.eval_prompts if lora else None)
    prompts = choose_prompts(
        pipe, len(given) if given else args.num_prompts, given=given, purpose="evaluation", log=say
    )
    n_calib = math.ceil(args.calib_samples / args.steps_per_prompt)
    calib = choose_prompts(pipe, n_calib, given=_lines(args.calib_prompts) if args.calib_prompts else None, log=say)
    scorer = getattr(pipe, "adherence_scorer", None)
    report = evaluate(
        lambda: load_pipeline(args.model_dir, drop),
        variants,
        prompts,
        seeds,
        calibration_prompts=calib,
        model_name=str(args.model_dir) + (f" + LoRA {lora.label()}" if lora else ""),
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        steps_per_prompt=args.steps_per_prompt,
        scorer=scorer if callable(scorer) else None,
        artifacts_dir=args.artifacts,
        call_kwargs=size,
        after_build=_after_build(lora.attach if lora else None, args.compile),
    )
    paths = write_report(report, args.out)
    print(paths["markdown"].read_text())
    print(f"wrote {paths['json']}, {paths['markdown']}, {paths['grid']}")
    return 0
