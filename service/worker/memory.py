"""Memory accounting: a per-call budget check, peak measurement, and freeing memory after an OOM.

The budget check is a coarse activation estimate made *before* a pipeline call, so an oversized batch
fails fast with ``MemoryError`` (reason ``oom``) instead of pushing the host into swap or the OOM killer.
Peak memory is process RSS on CPU (sampled at every denoising step) and CUDA max-allocated on GPU.
"""

from __future__ import annotations

import gc
import os
import resource
from typing import Any

import torch


def estimate_call_bytes(denoiser_config: dict[str, Any], *, images: int, height: int, width: int,
                        guidance: bool, dtype_bytes: int, pixel_space: bool = True) -> int:
    """Rough activation bytes of one pipeline call (the live tensors of one block, plus attention scores).

    DiT: rows × tokens × hidden × 16 (q, k, v, attention output, 4× MLP, norms, residuals) + rows × heads ×
    tokens² (scores). UNet: rows × H × W × widest channel count × 8. ``rows`` doubles with guidance.
    """
    rows = images * (2 if guidance else 1)
    scale = 1 if pixel_space else 8
    h, w = height // scale, width // scale
    if "patch_size" in denoiser_config:
        patch = int(denoiser_config["patch_size"])
        tokens = max(1, (h // patch) * (w // patch))
        heads = int(denoiser_config.get("num_attention_heads", 1))
        hidden = heads * int(denoiser_config.get("attention_head_dim", 64))
        return rows * dtype_bytes * (tokens * hidden * 16 + heads * tokens * tokens)
    channels = max(denoiser_config.get("block_out_channels") or [320])
    return rows * dtype_bytes * h * w * int(channels) * 8


def check_budget(estimate: int, budget: int | None) -> None:
    """Raise MemoryError when a call's estimate exceeds the configured budget (None: no budget)."""
    if budget is not None and estimate > budget:
        raise MemoryError(f"this batch needs an estimated {estimate:,} bytes of activations, more than the "
                          f"worker's budget of {budget:,} bytes")


def rss_bytes() -> int:
    """Current resident set size of this process."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, MemoryError) or (torch.cuda.is_available()
                                            and isinstance(exc, torch.cuda.OutOfMemoryError))


def free_memory() -> None:
    """Drop what an aborted call left behind so the next job starts from a clean allocator."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
