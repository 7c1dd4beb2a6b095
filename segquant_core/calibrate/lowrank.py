"""Optional low-rank branch (SVDQuant-style): keep the top singular directions of a weight in float.

``W ≈ down·up`` (rank r, taken from the SVD) plus a residual ``W − (down·up)ᵀ`` that gets quantized. The
rank is capped *below* the block's smaller dimension: at full rank the residual is exactly zero and the
"quantized" layer would silently run entirely in floating point.
"""

from __future__ import annotations

import torch


def cap_rank(rank: int, n: int, k: int) -> int:
    """Largest usable rank ≤ ``rank`` for an ``[n, k]`` block (always < min(n, k))."""
    return max(0, min(rank, min(n, k) - 1))


def lowrank_split(w: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(down [K, r], up [r, N], residual [N, K])`` with ``x·down·up + x·residualᵀ = x·wᵀ``."""
    n, k = w.shape
    r = cap_rank(rank, n, k)
    if r == 0:
        raise ValueError(f"no usable low-rank branch for a {n}×{k} block (rank must be < {min(n, k)})")
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    root = s[:r].sqrt()
    down = (vh[:r].t() * root).float()  # [K, r]
    up = (root.unsqueeze(1) * u[:, :r].t()).float()  # [r, N]
    residual = (w.double() - (down.double() @ up.double()).t()).float()
    return down, up, residual
