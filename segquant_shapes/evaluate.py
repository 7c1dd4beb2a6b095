"""Prompt-adherence evaluation of a shapes pipeline: generate prompt x seed grids and score them.

``python -m segquant_shapes.evaluate <pipeline dir> [--prompts 32 --seeds 4 --cfg 3 --steps 20]``
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from .adherence import aggregate, check_image
from .splits import calibration_prompts, eval_prompts


def evaluate_pipeline(
    pipe: Any,
    prompts: list[str],
    seeds: int = 4,
    guidance_scale: float = 3.0,
    steps: int = 20,
    batch: int = 32,
    grid_path: Path | None = None,
) -> dict[str, Any]:
    """Score ``len(prompts) * seeds`` samples; sample (prompt j, seed s) always uses generator seed s."""
    jobs = [(p, s) for s in range(seeds) for p in prompts]
    images: list[Image.Image] = []
    rows: list[dict[str, bool]] = []
    for start in tqdm(range(0, len(jobs), batch), desc="adherence", file=sys.stderr):
        chunk = jobs[start : start + batch]
        out = pipe(
            [p for p, _ in chunk],
            generator=[torch.Generator().manual_seed(s) for _, s in chunk],
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            output_type="pil",
        ).images
        images.extend(out)
        rows.extend(check_image(img, p) for img, (p, _) in zip(out, chunk))
    if grid_path is not None:
        save_grid(images, len(prompts), grid_path)
    result: dict[str, Any] = aggregate(rows)
    result.update(prompts=len(prompts), seeds=seeds, guidance_scale=guidance_scale, steps=steps)
    return result


def save_grid(images: list[Image.Image], cols: int, path: Path, scale: int = 2) -> None:
    """Tile images (one row per seed) into a PNG for a visual check."""
    w, h = images[0].size
    rows = (len(images) + cols - 1) // cols
    grid = Image.new("RGB", (cols * w, rows * h), (128, 128, 128))
    for i, img in enumerate(images):
        grid.paste(img, ((i % cols) * w, (i // cols) * h))
    grid.resize((cols * w * scale, rows * h * scale), Image.NEAREST).save(path)


def main(argv: list[str] | None = None) -> None:
    from . import load_pipeline

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("pipeline_dir")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--cfg", type=float, default=3.0)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--split", choices=["eval", "train"], default="eval")
    p.add_argument("--grid", default="")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    prompts = eval_prompts(args.prompts) if args.split == "eval" else calibration_prompts(args.prompts)
    res = evaluate_pipeline(
        pipe, prompts, args.seeds, args.cfg, args.steps, grid_path=Path(args.grid) if args.grid else None
    )
    sys.stdout.write(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
