"""GPTQ weight rounding for one weight block, with fixed scales.

Columns are quantized one at a time; each column's rounding error is spread over the not-yet-quantized
columns through the inverse Hessian ``H⁻¹`` of the layer inputs (``H = E[xxᵀ]``), in blocks of 128 columns
with lazy updates. Scales are fixed *before* the loop from the unmodified weight, so GPTQ only changes
which grid point each weight lands on. Dead input channels (zero Hessian diagonal) are zeroed; when the
damped Cholesky fails, damping grows ×10 up to ``max_retries`` times, then we fall back to plain rounding.

Everything is fp32 on the Hessian's device (as in the GPTQ paper's code): the damped Cholesky of a mean
``xxᵀ`` is well conditioned, and fp64 would double the largest temporaries (K×K; 0.9 GB per copy for
Flux's K = 15360). The Hessian passed in may be consumed in place (``overwrite_hessian``) so that at most
two further K×K matrices exist at once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from segquant_core.formats import dequantize, quantize
from segquant_core.quantizers import QuantizedWeight, WeightSpec, encode_weight, weight_scale

logger = logging.getLogger(__name__)


@dataclass
class GPTQInfo:
    damping: float
    attempts: int
    fell_back_to_rtn: bool
    dead_columns: int


def _inverse_hessian_factor(
    h: torch.Tensor, percdamp: float, max_retries: int
) -> tuple[torch.Tensor | None, float, int]:
    """Upper Cholesky factor of ``(h + damp·I)⁻¹``; ``h``'s diagonal is left damped."""
    diag = torch.diagonal(h)
    undamped = diag.clone()
    diag_mean = float(undamped.mean())
    damp = percdamp * (diag_mean if diag_mean > 0 else 1.0)
    for attempt in range(1, max_retries + 1):
        diag.copy_(undamped + damp)
        chol, info = torch.linalg.cholesky_ex(h)
        if int(info) == 0:
            hinv = torch.cholesky_inverse(chol)
            del chol
            u, info = torch.linalg.cholesky_ex(hinv, upper=True)
            del hinv
            if int(info) == 0 and bool(torch.isfinite(u).all()):
                return u, damp, attempt
        damp *= 10.0
    return None, damp, max_retries


def gptq_quantize(
    w: torch.Tensor,
    hessian: torch.Tensor,
    spec: WeightSpec,
    *,
    blocksize: int = 128,
    percdamp: float = 0.01,
    max_retries: int = 10,
    overwrite_hessian: bool = False,
) -> tuple[QuantizedWeight, GPTQInfo]:
    """GPTQ-round ``w [N, K]`` given ``hessian [K, K]`` (mean ``xxᵀ`` of the inputs ``w`` sees)."""
    k = w.shape[1]
    if hessian.shape != (k, k):
        raise ValueError(f"Hessian shape {tuple(hessian.shape)} does not match weight input size {k}")
    w = w.detach().float().clone()
    scale = weight_scale(w, spec)
    col_scale = scale.reshape(-1, 1) if scale.numel() > 1 else scale.reshape(1, 1)
    h = hessian.detach()
    h = h.float() if overwrite_hessian else h.float().clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    u, damp, attempts = _inverse_hessian_factor(h, percdamp, max_retries)
    del h
    if u is None:
        logger.warning("GPTQ: Cholesky failed after %d damping retries; using round-to-nearest", attempts)
        return encode_weight(w, spec, scale), GPTQInfo(damp, attempts, True, int(dead.sum()))
    u = u.float()
    q = torch.zeros_like(w)
    for i1 in range(0, k, blocksize):
        i2 = min(i1 + blocksize, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = w1[:, i]
            qcol = dequantize(quantize(col.unsqueeze(1), col_scale, spec.fmt), col_scale).squeeze(1)
            q[:, i1 + i] = qcol
            err = (col - qcol) / u1[i, i]
            w1[:, i:] -= err.unsqueeze(1) * u1[i, i:].unsqueeze(0)
            err1[:, i] = err
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
    return encode_weight(q, spec, scale), GPTQInfo(damp, attempts, False, int(dead.sum()))
