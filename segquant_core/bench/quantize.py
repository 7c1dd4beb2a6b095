"""``bench quantize``: what building a variant costs — memory at real size, time and equivalence on our models.

Two measurements:

* :func:`run_real_size_build` builds a variant of a random-weight ``SD3Transformer2DModel`` with the real
  SD3.5-medium config (depth reduced to ``layers``) in bf16 on CPU, calibrated on synthetic denoiser
  inputs of the real shapes (1024 image tokens, 333 text tokens, pooled 2048; no text encoder). It reports
  the float model's bytes, the peak RSS while :func:`~segquant_core.quantize.quantize` runs (``VmHWM``
  after a ``clear_refs`` reset), the recorded block inputs and the build's own overhead.
* :func:`run_calibration_comparison` builds one recipe on a real pipeline (the shipped models) with
  block-sequential and whole-model calibration alternately (A B A B …, medians): time ratio, and how many
  α choices and weight codes agree.
"""

from __future__ import annotations

import copy
import gc
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from segquant_core.bench.real_configs import sd35_medium_config
from segquant_core.bench.timing import current_peak_rss_bytes, reset_peak_rss
from segquant_core.quantize import QuantizationResult, quantize
from segquant_core.seglinear import SegLinear


def current_rss_bytes() -> int:
    """Resident set size of this process now (``VmRSS``)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmRSS in /proc/self/status")


def random_sd35_medium(layers: int, seed: int = 0) -> nn.Module:
    """SD3.5-medium's transformer with ``layers`` blocks, random weights, built directly in bf16."""
    from diffusers import SD3Transformer2DModel

    cfg = sd35_medium_config(layers)
    torch.manual_seed(seed)
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # no fp32 copy of the weights is ever made
    try:
        model = SD3Transformer2DModel(**cfg)
    finally:
        torch.set_default_dtype(before)
    return model.to(torch.bfloat16).eval()


def synthetic_sd35_calls(
    samples: int, *, image_tokens: int = 1024, text_tokens: int = 333, seed: int = 1
) -> list[dict[str, torch.Tensor]]:
    """Denoiser inputs of SD3.5-medium's real shapes (bf16): latents, T5+CLIP states, pooled, timestep."""
    side = round(image_tokens**0.5) * 2  # latent side: patch 2
    if (side // 2) ** 2 != image_tokens:
        raise ValueError(f"image_tokens must be a square number, got {image_tokens}")
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "hidden_states": torch.randn(1, 16, side, side, generator=g).to(torch.bfloat16),
            "encoder_hidden_states": torch.randn(1, text_tokens, 4096, generator=g).to(torch.bfloat16),
            "pooled_projections": torch.randn(1, 2048, generator=g).to(torch.bfloat16),
            "timestep": torch.rand(1, generator=g) * 1000,
        }
        for _ in range(samples)
    ]


def _param_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def run_real_size_build(
    recipe: str,
    *,
    layers: int,
    samples: int,
    image_tokens: int = 1024,
    text_tokens: int = 333,
    input_budget_bytes: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Build ``recipe`` on the random SD3.5-medium (``layers`` blocks); one row of memory and time figures."""
    from segquant_core.detect import detect

    model = random_sd35_medium(layers)
    float_bytes = _param_bytes(model)
    # The plan depends on feature sizes only: detect on a small call so tracing sets no memory peak.
    small = synthetic_sd35_calls(1, image_tokens=64, text_tokens=8, seed=99)[0]
    plan = detect(model, small)
    calls = synthetic_sd35_calls(samples, image_tokens=image_tokens, text_tokens=text_tokens)
    phases: dict[str, int] = {}

    def on_progress(phase: str, done: int, total: int) -> None:
        if phase == "backends" and done == 0:  # calibration and building are over; kernels are prepared next
            phases["build_peak"] = current_peak_rss_bytes()
            phases["build_seconds"] = time.perf_counter() - start
        if progress and phase == "calibrate":
            progress(f"{recipe}: {done}/{total} units")

    gc.collect()
    rss_before = current_rss_bytes()
    reset_peak_rss()
    start = time.perf_counter()
    result = quantize(
        model, recipe, calls, plan, progress=False, input_budget_bytes=input_budget_bytes, on_progress=on_progress
    )
    seconds = time.perf_counter() - start
    peak = current_peak_rss_bytes()
    inputs = int(result.calibration_run.get("peak_input_bytes", 0))
    build_peak = phases.get("build_peak", peak)
    return {
        "recipe": recipe,
        "layers": layers,
        "samples": samples,
        "float_model_bytes": float_bytes,
        "rss_before_bytes": rss_before,
        "peak_rss_bytes": build_peak,
        "recorded_input_bytes": inputs,
        "spilled_bytes": int(result.calibration_run.get("spilled_bytes", 0)),
        "quantized_bytes": result.quantized_bytes,
        # The build's own memory: the peak while calibrating and building, above everything resident before
        # (float model, calibration calls, the process), minus the recorded block inputs.
        "overhead_bytes": build_peak - rss_before - inputs,
        "seconds": round(phases.get("build_seconds", seconds), 1),
        # Then kernels are prepared for the new layers (prepacking, compiled quantizers): reported apart.
        "peak_rss_with_kernels_bytes": peak,
        "seconds_with_kernels": round(seconds, 1),
    }


def _codes(model: nn.Module, names: list[str]) -> dict[str, list[torch.Tensor]]:
    out = {}
    for n in names:
        layer = model.get_submodule(n)
        assert isinstance(layer, SegLinear)
        out[n] = [seg.quantized_weight().data for seg in layer.segs]
    return out


def compare_results(a: tuple[nn.Module, QuantizationResult], b: tuple[nn.Module, QuantizationResult]) -> dict[str, Any]:
    """How many segments chose the same α, and the share of identical weight codes, between two builds."""
    (ma, ra), (mb, rb) = a, b
    names = [n for n in ra.layers if n in rb.layers]
    alpha_same = alpha_total = 0
    for n in names:
        for sa, sb in zip(ra.layers[n].segments, rb.layers[n].segments):
            alpha_same += sa.alpha == sb.alpha
            alpha_total += 1
    same = total = 0
    ca, cb = _codes(ma, names), _codes(mb, names)
    for n in names:
        for x, y in zip(ca[n], cb[n]):
            same += int((x == y).sum())
            total += x.numel()
    return {
        "layers": len(names),
        "alpha_same": alpha_same,
        "alpha_total": alpha_total,
        "codes_identical": same / max(total, 1),
    }


def run_calibration_comparison(
    load_pipeline: Callable[[], Any],
    recipe: str,
    prompts: list[str],
    *,
    rounds: int = 2,
    steps: int = 20,
    steps_per_prompt: int = 4,
    progress: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Block-sequential vs whole-model calibration on a real pipeline: alternating build times, agreement."""
    from segquant_core.api import capture_calibration, denoiser_of, detect

    pipe = load_pipeline()
    model = denoiser_of(pipe)
    calib = capture_calibration(
        pipe, prompts, num_inference_steps=steps, steps_per_prompt=steps_per_prompt, progress=False
    )
    plan = detect(model, calib.calls[0])
    modes = {"whole-model": False, "sequential": True}
    times: dict[str, list[float]] = {m: [] for m in modes}
    last: dict[str, tuple[nn.Module, QuantizationResult]] = {}
    for r in range(rounds):
        for mode, sequential in modes.items():
            if progress:
                progress(f"round {r + 1}/{rounds}: {mode}")
            m = copy.deepcopy(model)
            gc.collect()
            start = time.perf_counter()
            res = quantize(m, recipe, calib, plan, progress=False, sequential=sequential)
            times[mode].append(time.perf_counter() - start)
            last[mode] = (m, res)
    agree = compare_results(last["sequential"], last["whole-model"])
    base = statistics.median(times["whole-model"])
    return [
        {
            "recipe": recipe,
            "mode": mode,
            "samples": len(calib),
            "median_s": round(statistics.median(t), 2),
            "vs_whole_model": round(statistics.median(t) / base, 3),
            "rounds": len(t),
            "alpha_same": f"{agree['alpha_same']}/{agree['alpha_total']}",
            "codes_identical": round(agree["codes_identical"], 6),
        }
        for mode, t in times.items()
    ]
