"""SmoothQuant: migrate activation outliers into the weights, per segment, with an α search.

For input channel c: ``s_c = max|x_c|^α / max|W_:,c|^(1-α)``, clamped to [1e-4, 1e4]. The layer then
computes ``(x / s) · (W · s)ᵀ``, which is the same product in exact arithmetic but moves range from
activations to weights. α is chosen per segment by the output error on cached calibration rows — every grid
value is scored, both ends included.

Two kinds of channel carry no information and get special factors:

* no activation signal (``max|x_c| = 0``): ``s_c = 1`` — the input is zero, nothing to move;
* an all-zero weight column (``max|W_:,c| = 0``) with a live activation: the formula's limit is ``s_c → ∞``.
  Such a channel cannot change the output, but with ``s_c = 1`` a large activation there would set the
  activation scale of the whole input and crush every useful channel into a few codes. It gets the largest
  factor ``S_MAX``, raised further when even ``x_c / S_MAX`` would exceed the largest smoothed activation of
  the live channels, so it never sets the activation range (``W_:,c · s_c`` stays 0 whatever ``s_c`` is).
"""

from __future__ import annotations

import torch

S_MIN, S_MAX = 1e-4, 1e4
_TINY = 2.0**-31


def smoothing_vector(x_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """Per-input-channel smoothing divisor ``s`` (fp32, same length as the inputs).

    ``x_absmax`` and ``w_absmax`` are per-input-channel maxima of ``|x|`` and of ``|W|`` over output rows.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"SmoothQuant α must lie in [0, 1], got {alpha}")
    xa = x_absmax.float()
    wa = w_absmax.float()
    no_signal = xa <= _TINY
    zero_column = (wa <= _TINY) & ~no_signal
    s = xa.clamp(min=_TINY).pow(alpha) / wa.clamp(min=_TINY).pow(1.0 - alpha)
    s = s.clamp(S_MIN, S_MAX)
    s = torch.where(no_signal | (wa <= _TINY), torch.ones_like(s), s)
    if zero_column.any():
        live = ~(no_signal | zero_column)
        live_peak = (xa[live] / s[live]).amax() if live.any() else xa.new_tensor(1.0)
        s = torch.where(zero_column, torch.maximum(xa / live_peak, xa.new_tensor(S_MAX)), s)
    return s
