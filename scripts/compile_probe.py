"""Eager vs compiled denoiser calls of the shipped MMDiT, without calibrating anything.

One denoiser call as the pipeline makes it (``BATCH`` images x CFG), for ``fp`` and the shipped
``w8a8-segquant`` / ``w4a8-segquant`` checkpoints, each eager and under ``sq.compile_denoiser``; candidates
alternate (warm-up, then ``ROUNDS`` rounds), medians. Then a torch.profiler table (self CPU time) of
compiled fp, compiled and eager w8a8-segquant. Writes JSON to stdout, the profiles to stderr.

    python scripts/compile_probe.py BATCH DTYPE ROUNDS      # e.g. 4 bfloat16 15
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

import segquant_core as sq
from segquant_cli.models import load_pipeline
from segquant_core.calibrate.capture import denoiser_of

SHIPPED = "segquant_shapes/weights/mmdit/variants"


def main(batch: int, dtype: torch.dtype, rounds: int) -> None:
    pipe = load_pipeline("shipped:mmdit").to(dtype)
    pipe.set_progress_bar_config(disable=True)
    den = denoiser_of(pipe)
    captured: dict[str, dict] = {}
    hook = den.register_forward_pre_hook(
        lambda m, a, kw: captured.setdefault("kw", dict(kw)) and None, with_kwargs=True
    )
    with torch.no_grad():
        pipe(["a red circle"] * batch, num_inference_steps=1, guidance_scale=3.0, output_type="np")
    hook.remove()
    kw = captured["kw"]
    models = {"fp": den, "fp+compiled": load_pipeline("shipped:mmdit").to(dtype).transformer}
    for v in ("w8a8-segquant", "w4a8-segquant"):
        models[v] = sq.load_denoiser(f"{SHIPPED}/{v}", device=torch.device("cpu"), dtype=dtype)
        models[f"{v}+compiled"] = sq.load_denoiser(f"{SHIPPED}/{v}", device=torch.device("cpu"), dtype=dtype)
    compile_s = {}
    for name, m in models.items():
        if name.endswith("+compiled"):
            compile_s[name] = round(sq.compile_denoiser(m, example_kwargs=kw, cache_key=f"probe/{name}").seconds, 1)
    samples: dict[str, list[float]] = {n: [] for n in models}
    with torch.no_grad():
        for m in models.values():
            m(**kw)
        for _ in range(rounds):
            for name, m in models.items():
                start = time.perf_counter()
                m(**kw)
                samples[name].append(time.perf_counter() - start)
    med = {n: statistics.median(s) for n, s in samples.items()}
    rows = [
        {
            "candidate": n,
            "median_ms": round(med[n] * 1e3, 2),
            "vs_fp": round(med["fp"] / med[n], 3),
            "vs_fp_compiled": round(med["fp+compiled"] / med[n], 3),
            "compile_s": compile_s.get(n),
        }
        for n in models
    ]
    sys.stdout.write(json.dumps({"batch": batch, "dtype": str(dtype), "rows": rows}, indent=1) + "\n")
    for name in ("fp+compiled", "w8a8-segquant+compiled", "w8a8-segquant"):
        with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                models[name](**kw)
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=60)
        sys.stderr.write(f"PROFILE {name}\n{table}\n")


if __name__ == "__main__":
    main(int(sys.argv[1]), getattr(torch, sys.argv[2]), int(sys.argv[3]))
