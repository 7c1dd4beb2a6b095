"""``bench pipeline``: a whole text-to-image pipeline, float vs each quantized variant.

Timing alternates the variants in one process (each call generates ``batch`` images with the same seeds).
Peak memory is measured per variant in a fresh subprocess (process RSS on CPU, CUDA max allocated on GPU),
because a process's high-water mark cannot be attributed to one of several models living in it. On CPU the
high-water mark is reset after loading and a short warm-up generation (kernel compilation, weight packing),
so it is the steady-state peak *while generating* (weights resident plus activations): the lifetime peak
of a small model's process is set by imports and loading, the same for every variant.
"""

from __future__ import annotations

import copy
import gc
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from segquant_core.api import (
    load_denoiser,
    load_into_pipeline,
    quantize_pipeline,
    read_manifest,
    replace_denoiser,
    resident_bytes,
    save,
)
from segquant_core.bench.peers import Peer, mark_against_peers
from segquant_core.bench.peers.denoiser import build_peer_denoiser, install_peer, uninstall_peer
from segquant_core.bench.timing import alternate
from segquant_core.calibrate.capture import capture_calibration, denoiser_of
from segquant_core.eval.metrics import mean_finite, psnr


def _module_bytes(m: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(m.parameters()) + list(m.buffers()))


def run_pipeline_bench(
    load_pipeline: Callable[[], Any],
    variants: list[str],
    calibration_prompts: list[str],
    *,
    prompt: str,
    batch: int = 4,
    steps: int = 20,
    guidance_scale: float = 3.0,
    rounds: int = 5,
    memory_cmd: list[str] | None = None,
    calib_steps_per_prompt: int = 4,
    device: str = "cpu",
    progress: Callable[[str], None] | None = None,
    dtype: torch.dtype = torch.float32,
    compiled: bool = False,
    checkpoints: dict[str, Path] | None = None,
    peers: list[Peer] | None = None,
) -> list[dict[str, object]]:
    """Rows per variant: s/image, s/step, speed-up vs fp, denoiser resident bytes (kernels included), peak
    memory (if measured, in a fresh process per variant that loads the variant's checkpoint as the worker
    does). On CUDA timing is synchronised and the memory is ``max_memory_allocated``.

    ``dtype``: the precision of the float parts (``fp``'s weights, every variant's norms and attention);
    variants are calibrated in fp32 first. ``compiled``: every variant, ``fp`` included, is also timed under
    ``torch.compile`` (``<name>+compiled``, its checkpoint loaded into a fresh pipeline as the worker does),
    with ``compile_s`` = its first call minus its median; ``vs_fp_compiled`` compares it with compiled ``fp``.
    ``checkpoints``: variants with a checkpoint already built (e.g. a shipped model's ``variants/``) load it as
    the worker does instead of being calibrated here: what is timed is then exactly what is served.
    ``peers``: each peer builds its int8 form of the fp32 denoiser, calibrated on the calls our variants
    calibrate on, and runs inside the same pipeline (:mod:`segquant_core.bench.peers.denoiser`); its row has
    ``build_s`` and no memory figure. Every row has ``psnr_vs_fp_db``: its images against ``fp``'s."""
    names = ["fp", *[v for v in variants if v != "fp"]]
    calib_steps_per_prompt = min(calib_steps_per_prompt, steps)  # a short bench run records every step
    pipes: dict[str, Any] = {}
    workdir = Path(tempfile.mkdtemp(prefix="segquant-bench-"))
    for name in names:
        if progress:
            progress(f"preparing {name}")
        pipe = load_pipeline()
        if device != "cpu":
            pipe = pipe.to(device)
        _quiet(pipe)
        prebuilt = (checkpoints or {}).get(name)
        if prebuilt is not None:
            replace_denoiser(pipe, load_denoiser(prebuilt, device=torch.device(device)))
        elif name != "fp":
            quantize_pipeline(
                pipe,
                name,
                calibration_prompts,
                num_inference_steps=steps,
                steps_per_prompt=calib_steps_per_prompt,
                guidance_scale=guidance_scale,
                progress=False,
            )
            save(denoiser_of(pipe), workdir / name.replace(":", "_"))
        if dtype != torch.float32:
            pipe = pipe.to(dtype)
        pipes[name] = pipe
    artifacts = {n: (checkpoints or {}).get(n, workdir / n.replace(":", "_")) for n in names if n != "fp"}
    first_call: dict[str, float] = {}
    if compiled:
        for name in names:
            if progress:
                progress(f"compiling {name}")
            pipes[f"{name}+compiled"] = _compiled_pipeline(load_pipeline, artifacts.get(name), device, dtype)
    build_s: dict[str, float] = {}
    if peers:
        calls = capture_calibration(  # the calls our variants calibrate on: same prompts, steps and seed
            load_pipeline(),
            calibration_prompts,
            num_inference_steps=steps,
            steps_per_prompt=calib_steps_per_prompt,
            guidance_scale=guidance_scale,
            progress=False,
        ).calls
        for peer in peers:
            if progress:
                progress(f"building peer {peer.name} ({len(calls) // batch} calibration calls of batch {batch})")
            pipe = load_pipeline()
            _quiet(pipe)
            start = time.perf_counter()
            built, constants = build_peer_denoiser(peer, copy.deepcopy(denoiser_of(pipe)), calls, batch)
            build_s[peer.label] = time.perf_counter() - start
            pipe = pipe.to(dtype)
            install_peer(denoiser_of(pipe), built, constants)
            pipes[peer.label] = pipe

    def make(pipe: Any) -> Callable[[], object]:
        def call() -> object:
            gens = [torch.Generator().manual_seed(i) for i in range(batch)]
            return pipe(
                [prompt] * batch,
                num_inference_steps=steps,
                guidance_scale=guidance_scale,
                generator=gens,
                output_type="np",
            )

        return call

    if progress:
        progress("timing")
    images: dict[str, Any] = {}
    with torch.no_grad():
        for name, pipe in pipes.items():  # first calls: compilation timed apart, images kept for the error
            start = time.perf_counter()
            images[name] = make(pipe)().images
            first_call[name] = time.perf_counter() - start
        timings = alternate(
            {n: make(p) for n, p in pipes.items()}, rounds=rounds, warmup=1, max_seconds=1200, device=device
        )
    fp = timings["fp"].median_s
    fp_compiled = timings["fp+compiled"].median_s if "fp+compiled" in timings else None
    rows = []
    for name, t in timings.items():
        row: dict[str, object] = {
            "variant": name,
            "batch": batch,
            "steps": steps,
            "s_per_image": round(t.median_s / batch, 4),
            "s_per_step": round(t.median_s / steps, 4),
            "vs_fp": round(fp / t.median_s, 3),
            "psnr_vs_fp_db": round(mean_finite([psnr(a, b) for a, b in zip(images["fp"], images[name])]), 2),
            "rounds": len(t.samples),
        }
        peer = name in build_s
        if peer:
            row.update(precision="int8 + the peer's float", checkpoint="peer build", build_s=round(build_s[name], 1))
        else:
            row.update(
                denoiser_bytes=resident_bytes(denoiser_of(pipes[name])),
                precision=str(dtype).removeprefix("torch."),
                checkpoint=_origin(name.removesuffix("+compiled"), checkpoints or {}),
            )
        if fp_compiled is not None and (name.endswith("+compiled") or peer):
            row["vs_fp_compiled"] = round(fp_compiled / t.median_s, 3)
        if name.endswith("+compiled"):
            row["compile_s"] = round(first_call[name] - t.median_s, 1)
        if memory_cmd is not None and not name.endswith("+compiled") and not peer:
            row["peak_memory_bytes"] = measure_peak_memory(
                memory_cmd, artifacts.get(name), prompt, batch, steps, guidance_scale, device
            )
        rows.append(row)
    for name in build_s:
        uninstall_peer(denoiser_of(pipes[name]))
    if peers:
        mark_against_peers(rows, peers, "batch", name_key="variant", time_key="s_per_image")
    return rows


def _quiet(pipe: Any) -> None:
    """No per-call progress bar (the bench prints its own progress)."""
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)


def _origin(variant: str, checkpoints: dict[str, Path]) -> str:
    if variant == "fp":
        return "float"
    return "prebuilt" if variant in checkpoints else "calibrated here"


# Issue 15's pipeline targets: speed-up of each quantized variant over fp in the same mode (eager vs eager fp,
# compiled vs compiled fp), batch 1 and 4.
PIPELINE_TARGETS = {"w8a8": 1.3, "w8a8-segquant": 1.1, "w4a8-segquant": 1.1}


def pipeline_targets(rows: list[dict[str, object]]) -> list[dict[str, object]]:
    """Met / not met per variant and mode (only the variants the issue names)."""
    items: list[dict[str, object]] = []
    for row in rows:
        name = str(row["variant"])
        compiled = name.endswith("+compiled")
        limit = PIPELINE_TARGETS.get(name.removesuffix("+compiled"))
        if limit is None:
            continue
        measured = row.get("vs_fp_compiled") if compiled else row["vs_fp"]
        if measured is None:
            continue
        items.append(
            {
                "target": f"{name} vs {'compiled ' if compiled else ''}fp, batch {row['batch']}",
                "measured": measured,
                "limit": f">= {limit}",
                "met": float(measured) >= limit,  # type: ignore[arg-type]
            }
        )
    return items


def _compiled_pipeline(load_pipeline: Callable[[], Any], artifact: Path | None, device: str, dtype: torch.dtype) -> Any:
    """A fresh pipeline with the variant's checkpoint loaded as the worker loads it, its denoiser compiled
    (compilation itself happens on the first call)."""
    from segquant_core.compile import compile_denoiser

    pipe = load_pipeline()
    _quiet(pipe)
    pipe = pipe.to(device=device, dtype=dtype)
    if artifact is not None:
        replace_denoiser(pipe, load_denoiser(artifact, device=torch.device(device), dtype=dtype))
    compile_denoiser(denoiser_of(pipe))
    return pipe


def measure_peak_memory(
    memory_cmd: list[str],
    artifact: Path | None,
    prompt: str,
    batch: int,
    steps: int,
    guidance_scale: float,
    device: str = "cpu",
) -> int | None:
    """Run ``memory_cmd + [json args]`` in a fresh process; it prints ``{"peak_bytes": …}`` last."""
    args = json.dumps(
        {
            "artifact": str(artifact) if artifact else None,
            "prompt": prompt,
            "batch": batch,
            "steps": steps,
            "guidance_scale": guidance_scale,
            "device": device,
        }
    )
    proc = subprocess.run([*memory_cmd, args], capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        return None
    try:
        return int(json.loads(proc.stdout.strip().splitlines()[-1])["peak_bytes"])
    except (ValueError, KeyError, IndexError):
        return None


def memory_probe(load_pipeline: Callable[[], Any], spec_json: str) -> None:
    """Subprocess side of :func:`measure_peak_memory`: load, apply the artifact, generate, print peak."""
    from segquant_core.bench.timing import current_peak_rss_bytes, reset_peak_rss

    spec = json.loads(spec_json)
    pipe = load_pipeline()
    _quiet(pipe)
    if spec.get("device", "cpu") != "cpu":
        pipe = pipe.to(spec["device"])
    if spec["artifact"]:
        if read_manifest(spec["artifact"])["format_version"] >= 2:
            # as the worker serves it: the checkpoint's own denoiser, the float one dropped
            float_denoiser = denoiser_of(pipe)
            dtype, device = next(float_denoiser.parameters()).dtype, next(float_denoiser.parameters()).device
            del float_denoiser
            replace_denoiser(pipe, load_denoiser(spec["artifact"], device=device, dtype=dtype))
            gc.collect()
        else:
            load_into_pipeline(spec["artifact"], pipe)
    cuda = torch.cuda.is_available() and next(denoiser_of(pipe).parameters()).is_cuda
    with torch.no_grad():  # warm-up: one-time costs (kernel compilation, weight packing) are not serving memory
        pipe(
            [spec["prompt"]] * spec["batch"],
            num_inference_steps=2,
            guidance_scale=spec["guidance_scale"],
            generator=[torch.Generator().manual_seed(i) for i in range(spec["batch"])],
            output_type="np",
        )
    gc.collect()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    else:
        reset_peak_rss()
    gens = [torch.Generator().manual_seed(i) for i in range(spec["batch"])]
    with torch.no_grad():
        pipe(
            [spec["prompt"]] * spec["batch"],
            num_inference_steps=spec["steps"],
            guidance_scale=spec["guidance_scale"],
            generator=gens,
            output_type="np",
        )
    peak = torch.cuda.max_memory_allocated() if cuda else current_peak_rss_bytes()
    sys.stdout.write(json.dumps({"peak_bytes": int(peak)}) + "\n")
