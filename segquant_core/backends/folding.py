"""Per-head in-segments as one int8 GEMM: each segment's static activation scale folded into the weight.

An in-segment layer with static scales computes ``y = Σ_h s_h · (codes_h · W_hᵀ) ⊙ w_h``: the activation
codes of head ``h`` carry their own scale ``s_h``, so every head is its own GEMM (K = 64 at SD3.5 shapes,
24 of them, each re-reading the whole output). Since ``s_h · w_h[n]`` only depends on the head and the output
column, the sum is one GEMM over the full K with the float weight ``V[n, k] = s_h(k) · w_h(k)[n] · W[n, k]``;
requantizing ``V`` per output row to int8 (scale ``v[n] = max_k |V[n, k]| / 127``) makes it one int8 GEMM.

That second rounding of the weights changes the numerics: a head whose ``s_h · w_h[n]`` is below the row's
largest gets a coarser weight grid. Measured against the reference backend it is well outside the backend
tolerance (docs/benchmarks.md, "segments and dual"), so folding is opt-in: ``SEGQUANT_CPU_IN_SEGMENTS=folded``
when the layer's kernels are prepared. The exact per-segment codes stay with the layer (they are what a
checkpoint stores); the folded weight is a second, kernel-only copy.
"""

from __future__ import annotations

import os

import torch

from segquant_core.formats import TINY_AMAX


def folding_requested() -> bool:
    """Whether in-segments should be folded into one GEMM (``SEGQUANT_CPU_IN_SEGMENTS=folded``)."""
    mode = os.environ.get("SEGQUANT_CPU_IN_SEGMENTS", "exact")
    if mode not in ("exact", "folded"):
        raise ValueError(f"SEGQUANT_CPU_IN_SEGMENTS must be 'exact' or 'folded', not {mode!r}")
    return mode == "folded"


def fold_in_segments(segments: list[tuple[torch.Tensor, torch.Tensor, float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """One int8 weight ``[N, K]`` and its per-column scale ``[N]`` for in-segments given as
    ``(codes [N, K_h], column scales [N], activation scale)`` in input order.

    The caller quantizes the input with each segment's own activation scale (per-channel scales) and runs
    ``codes · Qᵀ ⊙ v`` with an activation scale of 1.
    """
    folded = torch.cat(
        [codes.float() * (w_scale.float() * act_scale)[:, None] for codes, w_scale, act_scale in segments], 1
    )
    amax = folded.abs().amax(dim=1)
    scale = torch.where(amax > TINY_AMAX, amax / 127.0, torch.ones_like(amax))
    q = torch.clamp(torch.round(folded / scale[:, None]), -128, 127).to(torch.int8)
    return q, scale.contiguous()
