"""``bench memory``: what loading and serving quantized checkpoints really costs, in fresh processes.

The model is a random-weight denoiser with the real SD3.5-medium transformer config (``--layers`` of its
24 blocks; every other size real, so embeddings and the 384² position table are full size), in bf16.
The parent builds it once, saves it as a diffusers folder (``fp``) and as ``w8a8-segquant`` and
``w4a8-segquant`` checkpoints (calibrated on random example inputs: the memory does not depend on the
calibration). Each measurement then runs in a fresh subprocess, because a process's high-water mark
cannot be attributed to one of several things it did:

* ``baseline``: imports only (torch, diffusers, the engine) — the runtime's own RSS;
* ``fp`` / ``w8a8-segquant`` / ``w4a8-segquant``: one denoiser loaded (``from_pretrained`` /
  :func:`~segquant_core.load_denoiser`) — peak and resident RSS, and the denoiser's resident bytes;
* ``serve-3``: the three loaded in one process, as one worker serving all three variants.

On CUDA the same probes report ``torch.cuda.max_memory_allocated`` next to the process RSS.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from segquant_core.bench.real_configs import build_on_meta, sd35_medium_config

RECIPES = ("w8a8-segquant", "w4a8-segquant")
# Targets (issue 13): load peak ≤ baseline + LOAD_FACTOR × checkpoint bytes; serving the three ≤ baseline +
# shared parts + SERVE_FACTOR × Σ denoiser bytes.
LOAD_FACTOR = 1.2
SERVE_FACTOR = 1.15


def _file_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def prepare(workdir: Path, layers: int, progress: Callable[[str], None] | None = None) -> dict[str, Path]:
    """Write ``fp`` (diffusers folder) and one checkpoint per recipe under ``workdir``."""
    from diffusers import SD3Transformer2DModel

    from segquant_core.api import quantize, save
    from segquant_core.detect.examples import example_inputs_for

    torch.manual_seed(0)
    model = SD3Transformer2DModel.from_config(sd35_medium_config(layers)).to(torch.bfloat16).eval()
    paths = {"fp": workdir / "fp"}
    model.save_pretrained(str(paths["fp"]))
    calls = [example_inputs_for(model, batch=1, height=32, width=32) for _ in range(2)]
    for recipe in RECIPES:
        if progress:
            progress(f"quantizing a copy with {recipe}")
        q = copy.deepcopy(model)
        quantize(q, recipe, calls, progress=False)
        paths[recipe] = save(q, workdir / recipe)
        del q
    return paths


def probe(spec: dict[str, Any]) -> dict[str, Any]:
    """Subprocess side: load what ``spec`` names, report RSS (and CUDA) figures as JSON."""
    import gc

    import diffusers  # noqa: F401 - part of the runtime baseline

    import segquant_core as sq
    from segquant_core.bench.timing import current_peak_rss_bytes, reset_peak_rss

    device = spec.get("device", "cpu")
    cuda = device.startswith("cuda")
    gc.collect()
    baseline_rss = _rss_bytes()
    reset_peak_rss()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    models = []
    for kind, path in spec["load"]:
        if kind == "fp":
            from diffusers import SD3Transformer2DModel

            models.append(SD3Transformer2DModel.from_pretrained(path, dtype=torch.bfloat16).to(device).eval())
        else:
            models.append(sq.load_denoiser(path, device=device, dtype=torch.bfloat16))
    gc.collect()
    out = {
        "baseline_rss_bytes": baseline_rss,
        "peak_rss_bytes": current_peak_rss_bytes(),
        "rss_bytes": _rss_bytes(),
        "resident_bytes": [sq.resident_bytes(m) for m in models],
    }
    if cuda:
        out["cuda_max_allocated_bytes"] = int(torch.cuda.max_memory_allocated())
    return out


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def _run_probe(spec: dict[str, Any]) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "segquant_core.bench.memory", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"memory probe failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_memory_bench(
    layers: int = 2, *, device: str = "cpu", workdir: Path | None = None, progress: Callable[[str], None] | None = None
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows (one per probe) and the targets (each with its measured value, and ``targets_met``)."""
    work = Path(workdir or tempfile.mkdtemp(prefix="segquant-bench-memory-"))
    paths = prepare(work, layers, progress)
    probes = {
        "baseline": [],
        "fp": [("fp", str(paths["fp"]))],
        **{r: [(r, str(paths[r]))] for r in RECIPES},
        "serve-3": [("fp", str(paths["fp"])), *[(r, str(paths[r])) for r in RECIPES]],
    }
    results: dict[str, dict[str, Any]] = {}
    for name, load in probes.items():
        if progress:
            progress(f"probe {name} (fresh process)")
        results[name] = _run_probe({"load": load, "device": device})
    rows = []
    for name, r in results.items():
        row: dict[str, Any] = {
            "probe": name,
            "files_bytes": sum(_file_bytes(Path(p)) for _, p in probes[name]),
            "baseline_rss_bytes": r["baseline_rss_bytes"],
            "peak_rss_bytes": r["peak_rss_bytes"],
            "rss_bytes": r["rss_bytes"],
            "denoiser_bytes": sum(r["resident_bytes"]),
        }
        if "cuda_max_allocated_bytes" in r:
            row["cuda_max_allocated_bytes"] = r["cuda_max_allocated_bytes"]
        rows.append(row)
    targets = evaluate_targets(results, {n: _file_bytes(paths[n]) for n in paths})
    return rows, targets


def evaluate_targets(results: dict[str, dict[str, Any]], file_bytes: dict[str, int]) -> dict[str, Any]:
    """The issue's memory targets with their measured values; ``targets_met`` when all hold."""
    w8 = results["w8a8-segquant"]
    base = results["baseline"]["rss_bytes"]
    serve = results["serve-3"]
    denoisers = sum(results[n]["resident_bytes"][0] for n in ("fp", *RECIPES))
    items = [
        {
            "target": f"load w8a8-segquant: peak RSS <= baseline + {LOAD_FACTOR} x checkpoint bytes",
            "measured": w8["peak_rss_bytes"],
            "limit": int(w8["baseline_rss_bytes"] + LOAD_FACTOR * file_bytes["w8a8-segquant"]),
        },
        {
            "target": "load w8a8-segquant: peak RSS below loading fp",
            "measured": w8["peak_rss_bytes"],
            "limit": results["fp"]["peak_rss_bytes"] - 1,
        },
        {
            "target": f"serve fp + w8a8 + w4a8: RSS <= baseline + shared parts (0: bare denoiser) + {SERVE_FACTOR} x "
            "sum of denoiser bytes",
            "measured": serve["rss_bytes"],
            "limit": int(base + SERVE_FACTOR * denoisers),
        },
    ]
    for t in items:
        t["met"] = t["measured"] <= t["limit"]
    return {"items": items, "targets_met": all(t["met"] for t in items)}


if __name__ == "__main__":
    sys.stdout.write(json.dumps(probe(json.loads(sys.argv[1]))) + "\n")


# Text encoders and VAE by parameter count (CLIP-L 123.1M, CLIP-G 694.7M, T5-XXL encoder 4,762.3M, VAE 83.7M),
# all bf16; the denoisers come from their real configs (:mod:`.real_configs`).
REAL_DENOISERS = {"SD3.5-medium": "sd3.5-medium", "SD3.5-large": "sd3.5-large", "Flux.1-dev": "flux.1-dev"}
SHARED_PARAMS = {
    "SD3.5-medium": 123.1e6 + 694.7e6 + 4762.3e6 + 83.7e6,
    "SD3.5-large": 123.1e6 + 694.7e6 + 4762.3e6 + 83.7e6,
    "Flux.1-dev": 123.1e6 + 4762.3e6 + 83.7e6,
}


def computed_serving_bytes(name: str) -> dict[str, Any]:
    """COMPUTED (not measured) bytes of one worker serving fp + w8a8 + w4a8 of a real model with shared parts.

    The denoiser is built on the meta device from its real config (no memory); every ``nn.Linear`` is
    counted as quantized (the recipes keep a few small ones in float: a slight underestimate of the
    quantized variants). Resident: int8 codes once (the CPU prepack and the CUDA kernels both take int8,
    so W4 is resident at 1 byte per weight; it is 0.5 byte on disk), fp32 per-column scales, fp32 bias,
    smoothing vectors; everything else bf16.
    """
    model = build_on_meta(REAL_DENOISERS[name])
    linear_w = linear_cols = linear_k = 0
    other = 0
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    linear_ids = {id(p) for m in linears for p in m.parameters()}
    for m in linears:
        linear_w += m.weight.numel()
        linear_cols += m.out_features
        linear_k += m.in_features
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in linear_ids:
            other += t.numel()
    bias_cols = sum(m.out_features for m in linears if m.bias is not None)
    fp = 2 * (linear_w + bias_cols + other)
    extras = 4 * linear_cols + 4 * bias_cols + 4 * linear_k + 2 * other  # scales, fp32 bias, smoothing, float rest
    w8 = linear_w + extras
    w4_disk = linear_w // 2 + extras
    shared = int(2 * SHARED_PARAMS[name])
    return {
        "model": name,
        "denoiser_params": linear_w + bias_cols + other,
        "fp_bytes": fp,
        "w8a8_bytes": w8,
        "w4a8_resident_bytes": w8,
        "w4a8_checkpoint_bytes": w4_disk,
        "shared_bytes": shared,
        "serving_3_bytes": shared + fp + 2 * w8,
        "without_sharing_bytes": 3 * shared + fp + 2 * w8,
    }
