"""Sampled images of one variant, with or without an adapter, all prompts in one batched pipeline call.

The same protocol as ``segquant eval`` (calibration: the model's own calibration prompts, 4 denoiser calls
per prompt, 20 steps, CFG 3; the quantized model is built **without** the adapter, the adapter attached
afterwards), but every prompt of a variant is sampled in one batch: on a 2-core machine shared by many
jobs the per-image loop of ``segquant eval`` took ~170 s per 32x32 image, the batch ~27 s.

    # generate (one process per set; the quantized builds are cached under --artifacts)
    python docs/results/lora/sampled_fidelity.py gen --variant w8a8-segquant [--adapter DIR --scale 1] \
        [--merged] --out /work/runs/lora_sets/w8a8+lora
    # compare sets against their float reference
    python docs/results/lora/sampled_fidelity.py table --sets /work/runs/lora_sets

``--merged`` is merge-then-requantize: the adapter is fused into the float weights first, then quantized
(calibration captured from the merged pipeline), and no side branch is attached.
"""
# ruff: noqa: T201  (a measurement script: it prints its table)

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import segquant_core as sq
from segquant_core.calibrate.capture import denoiser_of
from segquant_core.eval.metrics import psnr, ssim
from segquant_core.prompts import choose_prompts
from segquant_shapes import load_shipped
from segquant_shapes.adherence import aggregate, check_image
from segquant_shapes.data import generate_examples
from segquant_shapes.text_encoder import encode_prompts

PROMPTS = Path(__file__).with_name("prompts16.txt")


def generate(a: argparse.Namespace) -> None:
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    prompts = [p.strip() for p in Path(a.prompts).read_text().splitlines() if p.strip()]
    prompts = prompts[: a.num_prompts] if a.num_prompts else prompts
    pipe = load_shipped("mmdit")
    pipe.set_progress_bar_config(disable=True)
    t0 = time.time()
    if a.merged:
        sq.load_lora(denoiser_of(pipe), a.adapter, "a", scale=a.scale)
        sq.fuse_lora(denoiser_of(pipe))
    if a.variant != "fp":
        cached = Path(a.artifacts) / a.variant if a.artifacts and not a.merged else None
        if cached is not None and (cached / "manifest.json").is_file():
            sq.load_into_pipeline(cached, pipe)
        elif a.calib_denoiser:  # cheap: denoiser calls built from train scenes, no pipeline capture
            ex = generate_examples(a.calib_denoiser, seed=5)
            sq.quantize(denoiser_of(pipe), a.variant, denoiser_calls(ex), progress=False)
        else:
            calib = choose_prompts(pipe, a.calib_samples // 4, purpose="calibration")
            sq.quantize_pipeline(
                pipe, a.variant, calib, num_inference_steps=20, steps_per_prompt=4, guidance_scale=3.0, progress=False
            )
            if cached is not None:
                sq.save(denoiser_of(pipe), cached)
    build_s = time.time() - t0
    runs = [(out, a.adapter)]
    if a.also_without and a.adapter and not a.merged:  # same build, first without the adapter
        runs = [(out.with_name(out.name + "-plain"), ""), (out, a.adapter)]
    for folder, adapter in runs:
        folder.mkdir(parents=True, exist_ok=True)
        if adapter and not a.merged:
            sq.load_lora(denoiser_of(pipe), adapter, "a", scale=a.scale)
        t0 = time.time()
        images = pipe(
            prompts,
            generator=[torch.Generator().manual_seed(a.seed) for _ in prompts],
            num_inference_steps=20,
            guidance_scale=3.0,
            output_type="pil",
        ).images
        for i, im in enumerate(images):
            im.save(folder / f"{i:03d}.png")
        meta = {
            "variant": a.variant,
            "adapter": adapter,
            "scale": a.scale,
            "merged": a.merged,
            "seed": a.seed,
            "prompts": prompts,
            "calib_samples": a.calib_samples,
            "calib_denoiser": a.calib_denoiser,
            "build_s": round(build_s, 1),
            "sample_s": round(time.time() - t0, 1),
        }
        (folder / "set.json").write_text(json.dumps(meta, indent=2) + "\n")
        print(json.dumps(meta), flush=True)


def denoiser_calls(examples: list) -> list[dict[str, torch.Tensor]]:
    """Denoiser inputs built like training batches: train scenes noised at flow times 0.2 / 0.5 / 0.8."""
    g = torch.Generator().manual_seed(2)
    states, pooled = encode_prompts([e.caption for e in examples])
    x0 = torch.from_numpy(np.stack([e.image for e in examples])).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    out = []
    for t in (0.2, 0.5, 0.8):
        xt = (1 - t) * x0 + t * torch.randn(x0.shape, generator=g)
        out.append(
            {
                "hidden_states": xt,
                "encoder_hidden_states": states,
                "pooled_projections": pooled,
                "timestep": torch.full((x0.shape[0],), 1000.0 * t),
            }
        )
    return out


def load_set(folder: Path) -> tuple[dict, list[np.ndarray]]:
    meta = json.loads((folder / "set.json").read_text())
    return meta, [np.asarray(Image.open(folder / f"{i:03d}.png").convert("RGB")) for i in range(len(meta["prompts"]))]


def table(a: argparse.Namespace) -> None:
    root = Path(a.sets)
    sets = {d.name: load_set(d) for d in sorted(root.iterdir()) if (d / "set.json").is_file()}
    print("| set | reference | PSNR (dB) | SSIM | style | background | color | position | shape | size |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, (meta, imgs) in sets.items():
        with_adapter = bool(meta["adapter"]) and meta["scale"] != 0
        ref_name = next(
            (
                n
                for n, (m, _) in sets.items()
                if m["variant"] == "fp"
                and not m["merged"]
                and (bool(m["adapter"]) and m["scale"] != 0) == with_adapter
                and (not with_adapter or m["scale"] == meta["scale"])
            ),
            None,
        )
        scores = aggregate([check_image(Image.fromarray(im), p) for im, p in zip(imgs, meta["prompts"])])
        if ref_name is None or ref_name == name:
            p_s = "—"
        else:
            ref = sets[ref_name][1]
            p = [psnr(r, im) for r, im in zip(ref, imgs)]
            finite = [v for v in p if np.isfinite(v)]
            p_s = f"{np.mean(finite):.2f} | {np.mean([ssim(r, im) for r, im in zip(ref, imgs)]):.4f}"
        p_s = p_s if "|" in p_s else f"{p_s} | —"
        attrs = " | ".join(
            f"{scores.get(k, float('nan')):.2f}" for k in ("style", "background", "color", "position", "shape", "size")
        )
        print(f"| {name} | {ref_name or '—'} | {p_s} | {attrs} |")


def main() -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("gen")
    g.add_argument("--variant", default="fp")
    g.add_argument("--adapter", default="")
    g.add_argument("--scale", type=float, default=1.0)
    g.add_argument("--merged", action="store_true")
    g.add_argument("--prompts", default=str(PROMPTS))
    g.add_argument("--calib-samples", type=int, default=64)
    g.add_argument("--artifacts", default="")
    g.add_argument(
        "--calib-denoiser",
        type=int,
        default=0,
        help="calibrate on N train scenes x 3 flow times (denoiser calls) instead of the pipeline loop",
    )
    g.add_argument("--also-without", action="store_true", help="also sample the same build without the adapter")
    g.add_argument("--num-prompts", type=int, default=0, help="only the first N prompts")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--threads", type=int, default=2)
    g.add_argument("--out", required=True)
    t = sub.add_parser("table")
    t.add_argument("--sets", required=True)
    a = p.parse_args()
    generate(a) if a.cmd == "gen" else table(a)


if __name__ == "__main__":
    main()
