"""SmoothQuant: migrate activation outliers into the weights, per segment, with an α search.

For input channel c: ``s_c = max|x_c|^α / max|W_:,c|^(1-α)`` (clamped to [1e-4, 1e4]; channels with no
signal get 1). The layer then computes ``(x / s) · (W · s)ᵀ``, which is the same product in exact
arithmetic but moves range from activations to weights. α is chosen per segment by the output error
on cached calibration rows — every grid value is scored, both ends included.
"""

from __future__ import annotations

import torch

S_MIN, S_MAX = 1e-4, 1e4
_TINY = 2.0**-31


def smoothing_vector(x_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """Per-input-channel smoothing divisor ``s`` (fp32, same length as the inputs)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"SmoothQuant α must lie in [0, 1], got {alpha}")
    xa = x_absmax.float()
    wa = w_absmax.float()
    dead = (xa <= _TINY) | (wa <= _TINY)
    s = xa.clamp(min=_TINY).pow(alpha) / wa.clamp(min=_TINY).pow(1.0 - alpha)
    s = s.clamp(S_MIN, S_MAX)
    return torch.where(dead, torch.ones_like(s), s)
