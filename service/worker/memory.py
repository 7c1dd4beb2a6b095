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

# SD3/SD3.5 encode 77 CLIP + 256 T5 tokens; used when a joint-attention DiT's caller does not say.
DEFAULT_TEXT_TOKENS = 333


def estimate_call_bytes(
    denoiser_config: dict[str, Any],
    *,
    images: int,
    height: int,
    width: int,
    guidance: bool,
    dtype_bytes: int,
    pixel_space: bool = True,
    vae_scale_factor: int | None = None,
    latent_packing: int = 1,
    text_tokens: int | None = None,
) -> int:
    """Rough activation bytes of one pipeline call (the live tensors of one block, plus attention scores).

    Latent models run on ``height / vae_scale_factor`` (8 when not given) latents, which Flux-style pipelines
    pack ``latent_packing``² at a time into one token before the patch embedding. DiT: rows × tokens × hidden ×
    16 (q, k, v, attention output, 4× MLP, norms, residuals) + rows × heads × tokens² (scores), where a
    joint-attention DiT (MMDiT, Flux) adds its text tokens. UNet: rows × H × W × widest channel count × 8.
    ``rows`` doubles with guidance.
    """
    rows = images * (2 if guidance else 1)
    scale = 1 if pixel_space else int(vae_scale_factor or 8)
    scale *= max(1, latent_packing)
    h, w = max(1, height // scale), max(1, width // scale)
    if "patch_size" in denoiser_config:
        patch = int(denoiser_config["patch_size"] or 1)
        tokens = max(1, (h // patch) * (w // patch))
        if denoiser_config.get("joint_attention_dim"):
            tokens += DEFAULT_TEXT_TOKENS if text_tokens is None else text_tokens
        heads = int(denoiser_config.get("num_attention_heads", 1))
        hidden = heads * int(denoiser_config.get("attention_head_dim", 64))
        return rows * dtype_bytes * (tokens * hidden * 16 + heads * tokens * tokens)
    channels = max(denoiser_config.get("block_out_channels") or [320])
    return rows * dtype_bytes * h * w * int(channels) * 8


def check_budget(estimate: int, budget: int | None) -> None:
    """Raise MemoryError when a call's estimate exceeds the configured budget (None: no budget)."""
    if budget is not None and estimate > budget:
        raise MemoryError(
            f"this batch needs an estimated {estimate:,} bytes of activations, more than the "
            f"worker's budget of {budget:,} bytes"
        )


def rss_bytes() -> int:
    """Current resident set size of this process."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, MemoryError) or (torch.cuda.is_available() and isinstance(exc, torch.cuda.OutOfMemoryError))


def free_memory() -> None:
    """Drop what an aborted call left behind so the next job starts from a clean allocator."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
