"""Side-by-side timing: candidates run alternately (A B C A B C …) after a warm-up, medians compared.

Alternating in one process exposes every candidate to the same machine noise (other jobs, frequency
changes), so the *ratios* are trustworthy even on a shared 2-core box where absolute times wander.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class Timing:
    name: str
    median_s: float
    samples: list[float]

    @property
    def median_ms(self) -> float:
        return self.median_s * 1e3


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def alternate(
    candidates: dict[str, Callable[[], object]],
    *,
    rounds: int = 10,
    warmup: int = 2,
    device: str = "cpu",
    max_seconds: float | None = None,
) -> dict[str, Timing]:
    """Median wall time of each candidate over ``rounds`` interleaved runs (after ``warmup`` each)."""
    for _ in range(warmup):
        for fn in candidates.values():
            fn()
    _sync(device)
    samples: dict[str, list[float]] = {n: [] for n in candidates}
    start = time.perf_counter()
    for r in range(rounds):
        for name, fn in candidates.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            samples[name].append(time.perf_counter() - t0)
        if max_seconds is not None and r >= 2 and time.perf_counter() - start > max_seconds:
            break
    return {n: Timing(n, statistics.median(s), s) for n, s in samples.items()}


def environment(device: str = "cpu") -> dict[str, object]:
    """What the numbers were measured on."""
    info: dict[str, object] = {
        "device": device,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def peak_rss_bytes() -> int:
    """High-water resident set size of this process (Linux reports KiB)."""
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def reset_peak_rss() -> bool:
    """Reset this process's RSS high-water mark (Linux ``clear_refs``); False where that is not possible.

    Lets a benchmark measure the peak of one phase (e.g. generation with the weights resident) instead of
    the process-lifetime peak, which imports and model loading usually set.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def current_peak_rss_bytes() -> int:
    """RSS high-water mark since the last :func:`reset_peak_rss` (``VmHWM``), else since process start."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return peak_rss_bytes()
