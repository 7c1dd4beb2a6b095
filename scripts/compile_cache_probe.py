"""Does a second process reuse Inductor's on-disk cache? Run twice with the same folder and compare.

Loads the shipped ``w8a8-segquant`` MMDiT checkpoint into the shipped pipeline (bf16), compiles the denoiser
with a cache key (so both processes build the same graph), and times a 2-step, 1-image generation twice;
prints the times and Inductor's FX graph cache hits and misses as JSON.

    python scripts/compile_cache_probe.py /tmp/inductor-cache   # first process: compiles
    python scripts/compile_cache_probe.py /tmp/inductor-cache   # second process: reads the cache
"""

from __future__ import annotations

import json
import sys
import time

import torch
from torch._dynamo.utils import counters

import segquant_core as sq
from segquant_cli.models import load_pipeline

CHECKPOINT = "segquant_shapes/weights/mmdit/variants/w8a8-segquant"


def main(cache: str) -> None:
    sq.use_cache_dir(cache)
    pipe = load_pipeline("shipped:mmdit")
    pipe.set_progress_bar_config(disable=True)
    denoiser = sq.load_denoiser(CHECKPOINT, device=torch.device("cpu"), dtype=torch.bfloat16)
    sq.replace_denoiser(pipe, denoiser)
    pipe = pipe.to(torch.bfloat16)
    sq.compile_denoiser(denoiser, cache_key="mmdit/w8a8-segquant")

    def call() -> float:
        start = time.perf_counter()
        with torch.no_grad():
            pipe(
                ["a red circle"],
                num_inference_steps=2,
                guidance_scale=3.0,
                generator=[torch.Generator().manual_seed(0)],
                output_type="np",
            )
        return time.perf_counter() - start

    first, second = call(), call()
    result = {
        "first_s": round(first, 1),
        "second_s": round(second, 2),
        "fxgraph_cache_hit": counters["inductor"]["fxgraph_cache_hit"],
        "fxgraph_cache_miss": counters["inductor"]["fxgraph_cache_miss"],
    }
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
