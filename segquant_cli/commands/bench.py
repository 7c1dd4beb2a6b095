"""``segquant bench layer|block|pipeline|quantize``: float vs quantized, measured side by side, ratios printed."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from segquant_cli.errors import CLIError

PEERS_HELP = (
    "comma-separated CPU peers timed in the same run: pt2e (torchao X86InductorQuantizer + Inductor "
    "freezing), openvino (NNCF INT8, linears only); needs the 'peers' extra"
)
PIPELINE_PEERS_HELP = (
    "comma-separated CPU peers run inside the same pipeline and timing loop: pt2e, openvino (each builds its "
    "int8 denoiser from the float one, calibrated on our calibration calls); needs the 'peers' extra"
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="benchmark float vs quantized (layer, block, pipeline)",
        description="Alternating side-by-side timing with medians and ratios; tables + JSON.",
    )
    levels = p.add_subparsers(dest="level", metavar="LEVEL", required=True)

    lp = levels.add_parser("layer", help="one linear layer at DiT shapes")
    lp.add_argument(
        "--model",
        choices=["sd35", "flux", "targets"],
        default="targets",
        help="shape set: the CPU target shapes (default), SD3.5-medium or Flux",
    )
    lp.add_argument("--tokens", default="1024", help="comma-separated token counts for sd35/flux (default 1024)")
    lp.add_argument("--rounds", type=int, default=10)
    lp.add_argument("--no-compile", action="store_true", help="skip the torch.compile bf16 baseline")
    lp.add_argument("--fp8", action="store_true", help="include fp8 (slow on CPU)")
    lp.add_argument("--reference", action="store_true", help="include the fake-quant reference backend")
    lp.add_argument("--json", default="bench-layer.json", help="where to write the JSON (default bench-layer.json)")
    lp.add_argument(
        "--device",
        default="cpu",
        choices=["cpu", "cuda"],
        help="cuda: CUDA-synchronised timing, cuBLAS bf16 baseline, max_memory_allocated per candidate",
    )
    lp.add_argument("--peers", default="", help=PEERS_HELP)

    bp = levels.add_parser("block", help="one SD3.5-medium-shaped transformer block")
    bp.add_argument("--recipes", default="w8a8,w8a8-segquant,w4a8-segquant")
    bp.add_argument("--tokens", type=int, default=1024)
    bp.add_argument("--context-tokens", type=int, default=333)
    bp.add_argument("--rounds", type=int, default=6)
    bp.add_argument("--json", default="bench-block.json")
    bp.add_argument(
        "--lora-rank",
        type=int,
        default=0,
        help="also time each recipe with a random LoRA of this rank on every linear (float side branch)",
    )
    bp.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    bp.add_argument("--peers", default="", help=PEERS_HELP)
    bp.add_argument(
        "--compile",
        action="store_true",
        help="also time bf16 and every recipe under torch.compile (+compiled candidates)",
    )

    pp = levels.add_parser("pipeline", help="the shipped model end to end, fp vs each variant")
    pp.add_argument("--model", default="shipped:mmdit", help="pipeline dir or shipped:NAME (mmdit, unet, flux)")
    pp.add_argument("--variants", default="w8a8-segquant,w4a8-segquant")
    pp.add_argument("--batch", type=int, default=4)
    pp.add_argument("--steps", type=int, default=20)
    pp.add_argument("--rounds", type=int, default=5)
    pp.add_argument("--memory", action="store_true", help="also measure peak memory per variant (subprocesses)")
    pp.add_argument("--json", default="bench-pipeline.json")
    pp.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    pp.add_argument(
        "--compile",
        action="store_true",
        help="also time every variant, fp included, under torch.compile (+compiled candidates)",
    )
    pp.add_argument(
        "--checkpoints",
        default="auto",
        help="folder of prebuilt variant checkpoints (<dir>/<variant>) loaded instead of calibrating; "
        "'auto' (default): the shipped model's own variants/ for shipped:NAME, 'none': calibrate every variant",
    )
    pp.add_argument("--peers", default="", help=PIPELINE_PEERS_HELP)
    pp.add_argument(
        "--precision",
        default="float32",
        choices=["float32", "bfloat16"],
        help="precision of the float parts (fp's weights, every variant's norms and attention)",
    )

    qp = levels.add_parser(
        "quantize",
        help="build cost: memory at real size (SD3.5-medium config), or "
        "block-sequential vs whole-model calibration on a shipped model",
    )
    qp.add_argument(
        "--model",
        default="sd35-medium",
        help="sd35-medium (random weights, real config, synthetic inputs; default) or a pipeline "
        "(shipped:mmdit / shipped:unet / shipped:flux / a directory) to compare calibration modes on",
    )
    qp.add_argument("--layers", type=int, default=4, help="blocks of the SD3.5-medium model (default 4)")
    qp.add_argument("--samples", type=int, default=16, help="calibration calls (default 16)")
    qp.add_argument(
        "--recipe",
        "--recipes",
        dest="recipes",
        default="w4a8-segquant,w8a8-segquant",
        help="comma-separated recipes (default w4a8-segquant,w8a8-segquant)",
    )
    qp.add_argument(
        "--input-budget",
        type=float,
        default=None,
        help="GiB of recorded block inputs kept in memory before spilling (default: half the free RAM)",
    )
    qp.add_argument("--rounds", type=int, default=2, help="alternating rounds for a pipeline model (default 2)")
    qp.add_argument("--json", default="bench-quantize.json")

    mem = levels.add_parser("memory", help="load/serve memory of checkpoints (random SD3.5-medium, fresh processes)")
    mem.add_argument("--layers", type=int, default=2, help="SD3.5-medium blocks to build, 1-24 (default 2)")
    mem.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    mem.add_argument("--workdir", help="where to write the fp folder and checkpoints (default: a temp folder)")
    mem.add_argument("--json", default="bench-memory.json")

    mp = levels.add_parser("memory-probe", help=argparse.SUPPRESS)
    mp.add_argument("model")
    mp.add_argument("spec")
    p.set_defaults(run=run)


def _require_cuda() -> None:
    import torch

    if not torch.cuda.is_available():
        raise CLIError("--device cuda: no CUDA device is available here")


def _peers(args: argparse.Namespace) -> list:
    """The peers ``--peers`` names (CPU only); a missing package or unknown name is one readable line."""
    names = [n.strip() for n in getattr(args, "peers", "").split(",") if n.strip()]
    if not names:
        return []
    if getattr(args, "device", "cpu") != "cpu":
        raise CLIError("--peers: the peers are CPU runtimes; use --device cpu")
    from segquant_core.bench.peers import PeerUnavailable, resolve_peers

    try:
        return resolve_peers(names)
    except (ValueError, PeerUnavailable) as e:
        raise CLIError(f"--peers: {e}") from None


def run(args: argparse.Namespace) -> int:
    from segquant_core.bench.report import print_table, write_json, write_markdown
    from segquant_core.bench.timing import environment

    command = "segquant " + " ".join(shlex.quote(a) for a in sys.argv[1:])

    def say(msg: str) -> None:
        print(f"… {msg}", file=sys.stderr, flush=True)

    device = getattr(args, "device", "cpu")
    if device == "cuda":
        _require_cuda()
    env = environment(device)
    peers = _peers(args)
    if device == "cuda":  # titles name the processor the numbers come from
        env["cpu"] = f"{env.get('gpu')} (sm_{env.get('capability')})"
    if args.level == "layer":
        from segquant_core.bench.layer import cpu_target_shapes, default_shapes, run_layer_bench

        if args.model == "targets":
            shapes = cpu_target_shapes()
        else:
            try:
                tokens = tuple(int(t) for t in args.tokens.split(","))
            except ValueError:
                raise CLIError(f"--tokens must be comma-separated integers, got {args.tokens!r}") from None
            shapes = default_shapes(args.model, tokens)
        rows = run_layer_bench(
            shapes,
            rounds=args.rounds,
            include_compile=not args.no_compile,
            include_fp8=args.fp8,
            include_reference=args.reference,
            device=device,
            progress=say,
            peers=peers,
        )
        title = f"bench layer — {env['cpu']}, {env['threads']} threads, torch {env['torch']}"
        columns = ["shape", "candidate", "median_ms", "vs_bf16", "vs_fp32", "vs_torch_ao", "rel_err", "weight_bytes"]
    elif args.level == "block":
        from segquant_core.bench.block import run_block_bench

        recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
        rows = run_block_bench(
            recipes,
            tokens=args.tokens,
            context_tokens=args.context_tokens,
            rounds=args.rounds,
            device=device,
            progress=say,
            lora_rank=args.lora_rank,
            compiled=args.compile,
            peers=peers,
        )
        title = f"bench block — {env['cpu']}, {env['threads']} threads, torch {env['torch']}"
        columns = ["case", "candidate", "median_ms", "vs_bf16", "rel_err"]
        if args.compile:
            columns[4:4] = ["vs_bf16_compiled", "compile_s"]
    elif args.level == "pipeline":
        import torch

        from segquant_cli.models import load_pipeline
        from segquant_core.bench.pipeline import run_pipeline_bench

        probe = load_pipeline(args.model)
        calib = getattr(probe, "default_calibration_prompts", None)
        prompts = list(calib()) if callable(calib) else None
        if not prompts:
            raise CLIError("this pipeline has no default calibration prompts")
        evals = getattr(probe, "default_eval_prompts", None)
        prompt = next(iter(evals(1))) if callable(evals) else prompts[0]
        variants = [v.strip() for v in args.variants.split(",") if v.strip()]
        memory_cmd = (
            [sys.executable, "-m", "segquant_cli", "bench", "memory-probe", args.model] if args.memory else None
        )
        checkpoints = _prebuilt_checkpoints(args.model, args.checkpoints, variants)
        if checkpoints:
            say("prebuilt checkpoints: " + ", ".join(f"{v} ({p})" for v, p in checkpoints.items()))
        rows = run_pipeline_bench(
            lambda: load_pipeline(args.model),
            variants,
            prompts[:16],
            prompt=prompt,
            batch=args.batch,
            steps=args.steps,
            rounds=args.rounds,
            memory_cmd=memory_cmd,
            device=device,
            progress=say,
            dtype=getattr(torch, args.precision),
            compiled=args.compile,
            checkpoints=checkpoints,
            peers=peers,
        )
        title = (
            f"bench pipeline — {args.model}, {args.precision}, {env['cpu']}, {env['threads']} threads, "
            f"torch {env['torch']}"
        )
        columns = ["variant", "s_per_image", "s_per_step", "vs_fp", "psnr_vs_fp_db", "denoiser_bytes"]
        columns += ["peak_memory_bytes"] if args.memory else []
        if args.compile:
            columns[4:4] = ["vs_fp_compiled", "compile_s"]
        if peers:
            columns.append("build_s")
    elif args.level == "quantize":
        rows, title, columns = _quantize_rows(args, env, say)
    elif args.level == "memory":
        from segquant_core.bench.memory import REAL_DENOISERS, computed_serving_bytes, run_memory_bench

        try:
            rows, targets = run_memory_bench(
                args.layers, device=args.device, workdir=Path(args.workdir) if args.workdir else None, progress=say
            )
        except ValueError as e:
            raise CLIError(str(e)) from None
        title = f"bench memory — random SD3.5-medium, {args.layers} of 24 blocks, bf16, {args.device}, {env['cpu']}"
        columns = ["probe", "files_bytes", "baseline_rss_bytes", "peak_rss_bytes", "rss_bytes", "denoiser_bytes"]
        if args.device == "cuda":
            columns.append("cuda_max_allocated_bytes")
        print_table(title, rows, columns)
        print_table("targets", targets["items"], ["target", "measured", "limit", "met"])
        print(f"targets_met: {targets['targets_met']}")
        import json

        from segquant_core.bench.report import markdown_table

        path = write_json(Path(args.json), args.level, env, rows, command)
        data = json.loads(path.read_text())
        computed = [computed_serving_bytes(n) for n in REAL_DENOISERS]
        computed_cols = [
            "model",
            "fp_bytes",
            "w8a8_bytes",
            "w4a8_resident_bytes",
            "w4a8_checkpoint_bytes",
            "shared_bytes",
            "serving_3_bytes",
            "without_sharing_bytes",
        ]
        print_table(
            "COMPUTED (not measured): one worker serving fp + w8a8 + w4a8 with shared parts", computed, computed_cols
        )
        data.update(targets=targets["items"], targets_met=targets["targets_met"], computed=computed)
        path.write_text(json.dumps(data, indent=2) + "\n")
        md = write_markdown(Path(args.json).with_suffix(".md"), title, rows, columns, command)
        with md.open("a") as f:
            f.write("\n" + markdown_table(targets["items"], ["target", "measured", "limit", "met"]))
            f.write(f"\ntargets_met: {targets['targets_met']}\n")
            f.write("\nCOMPUTED (not measured), from the real configs on the meta device:\n\n")
            f.write(markdown_table(computed, computed_cols))
        print(f"wrote {path} and {md}")
        return 0
    else:  # memory-probe: the subprocess side of --memory
        from segquant_cli.models import load_pipeline
        from segquant_core.bench.pipeline import memory_probe

        memory_probe(lambda: load_pipeline(args.model), args.spec)
        return 0
    if peers:  # each peer's ratio, and whether the row beat them all
        columns += [f"vs_{p.name}" for p in peers] + ["faster_than_peers"]
        columns += ["int8_linears"] if args.level == "block" else []
    print_table(title, rows, columns)
    targets = _issue15_targets(args.level, rows, peers)
    path = write_json(Path(args.json), args.level, env, rows, command, targets)
    md = write_markdown(Path(args.json).with_suffix(".md"), title, rows, columns, command)
    if targets:
        from segquant_core.bench.report import markdown_table

        print_table("targets (issue 15)", targets, ["target", "measured", "limit", "met"])
        with md.open("a") as f:
            f.write("\n" + markdown_table(targets, ["target", "measured", "limit", "met"]))
    print(f"wrote {path} and {md}")
    return 0


def _issue15_targets(level: str, rows: list[dict], peers: list) -> list[dict]:
    """Issue 15's speed targets for this level's rows, met / not met (none for the other levels)."""
    from segquant_core.bench.block import block_targets
    from segquant_core.bench.layer import layer_targets
    from segquant_core.bench.pipeline import pipeline_targets

    if level == "layer":
        return layer_targets(rows, peers)
    if level == "block":
        return block_targets(rows)
    return pipeline_targets(rows) if level == "pipeline" else []


def _quantize_rows(args: argparse.Namespace, env: dict, say) -> tuple[list[dict], str, list[str]]:
    from segquant_core.recipes import recipe as resolve_recipe

    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    for name in recipes:
        try:
            resolve_recipe(name)
        except (KeyError, ValueError) as e:
            raise CLIError(f"--recipe: {e}") from None
    if args.layers < 1 or args.samples < 1 or args.rounds < 1:
        raise CLIError("--layers, --samples and --rounds must be at least 1")
    if args.model == "sd35-medium":
        from segquant_core.bench.quantize import run_real_size_build

        budget = None if args.input_budget is None else int(args.input_budget * (1 << 30))
        rows = [
            run_real_size_build(r, layers=args.layers, samples=args.samples, input_budget_bytes=budget, progress=say)
            for r in recipes
        ]
        title = (
            f"bench quantize — random SD3.5-medium, {args.layers} blocks, bf16, {args.samples} samples of "
            f"1024+333 tokens, {env['cpu']}, {env['threads']} threads, torch {env['torch']}"
        )
        columns = [
            "recipe",
            "layers",
            "samples",
            "float_model_bytes",
            "peak_rss_bytes",
            "recorded_input_bytes",
            "overhead_bytes",
            "seconds",
            "peak_rss_with_kernels_bytes",
        ]
        return rows, title, columns
    from segquant_cli.models import load_pipeline
    from segquant_core.bench.quantize import run_calibration_comparison

    probe = load_pipeline(args.model)
    calib = getattr(probe, "default_calibration_prompts", None)
    prompts = list(calib()) if callable(calib) else None
    if not prompts:
        raise CLIError(f"{args.model} has no default calibration prompts")
    prompts = prompts[: max(1, args.samples // 4)]  # 4 recorded steps per prompt
    rows = []
    for r in recipes:
        rows += run_calibration_comparison(
            lambda: load_pipeline(args.model), r, prompts, rounds=args.rounds, progress=say
        )
    title = f"bench quantize — {args.model}, {env['cpu']}, {env['threads']} threads, torch {env['torch']}"
    columns = ["recipe", "mode", "samples", "median_s", "vs_whole_model", "rounds", "alpha_same", "codes_identical"]
    return rows, title, columns


def _prebuilt_checkpoints(model: str, choice: str, variants: list[str]) -> dict[str, Path]:
    """The variants of ``bench pipeline`` that load a checkpoint instead of being calibrated (see --checkpoints)."""
    if choice == "none":
        return {}
    if choice == "auto":
        if not model.startswith("shipped:"):
            return {}
        from segquant_cli.shipped_checkpoints import variants_dir

        root = variants_dir(model.removeprefix("shipped:"))
    else:
        root = Path(choice)
        if not root.is_dir():
            raise CLIError(f"--checkpoints: {choice} is not a folder")
    return {v: root / v for v in variants if v != "fp" and (root / v / "manifest.json").is_file()}
