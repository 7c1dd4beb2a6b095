"""Per-layer input statistics gathered in one hooked pass over the calibration calls.

For every layer to quantize we keep, over all calibration inputs:

* the per-input-channel positive max and negative magnitude max — enough to compute the static
  activation scale (single or DualScale) of *any* smoothing vector without re-running the model, because
  ``max(x / s) = max_c(max_c(x) / s_c)`` for ``s > 0``;
* a seeded sample of input rows on which the α search is scored. With more than one calibration call the
  search is *held out*: candidate scales come from the even-numbered calls' maxima (``fit_*``) and are
  scored on rows of the odd-numbered calls, so an α that merely fits the calibration maxima (α → 1
  normalises every channel to exactly its observed max) does not win by clipping unseen inputs;
* optionally the GPTQ Hessian ``Σ xxᵀ`` (full for out-segments, one block per in-segment).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from segquant_core.detect.plan import Segments


@dataclass
class InputStats:
    in_features: int
    pos_max: torch.Tensor  # [K] max of x⁺ per channel
    neg_max: torch.Tensor  # [K] max of |x⁻| per channel
    fit_pos_max: torch.Tensor | None = None  # the same over the even-numbered calls only
    fit_neg_max: torch.Tensor | None = None
    rows: list[torch.Tensor] = field(default_factory=list)
    hessians: list[torch.Tensor] | None = None  # one per block (see ``hessian_bounds``)
    hessian_bounds: list[tuple[int, int]] = field(default_factory=list)
    count: int = 0  # rows seen

    @property
    def abs_max(self) -> torch.Tensor:
        return torch.maximum(self.pos_max, self.neg_max)

    def sample(self) -> torch.Tensor:
        return torch.cat(self.rows) if self.rows else torch.zeros(0, self.in_features)

    def hessian(self, a: int, b: int) -> torch.Tensor:
        """Mean ``xxᵀ`` over input columns ``[a, b)``."""
        if self.hessians is None:
            raise ValueError("no Hessian was collected (GPTQ was not requested for this layer)")
        for (lo, hi), h in zip(self.hessian_bounds, self.hessians):
            if lo <= a and b <= hi:
                return h[a - lo:b - lo, a - lo:b - lo] / max(self.count, 1)
        raise ValueError(f"no Hessian block covers columns [{a}, {b})")


class InputObserver:
    """Forward pre-hooks that fill an :class:`InputStats` per watched linear layer."""

    def __init__(self, layers: dict[str, nn.Linear], *, rows_per_call: int, seed: int = 0,
                 hessian_for: dict[str, Segments | None] | None = None) -> None:
        self.stats: dict[str, InputStats] = {}
        self._handles: list = []
        self._gen = torch.Generator().manual_seed(seed)
        self._rows_per_call = rows_per_call
        self._call = 0
        self._held_out = False
        for name, lin in layers.items():
            k = lin.in_features
            st = InputStats(k, torch.zeros(k), torch.zeros(k))
            if hessian_for is not None and name in hessian_for:
                seg = hessian_for[name]
                bounds = seg.bounds() if (seg is not None and seg.axis == "in") else [(0, k)]
                st.hessian_bounds = bounds
                st.hessians = [torch.zeros(b - a, b - a, dtype=torch.float64) for a, b in bounds]
            self.stats[name] = st
            self._handles.append(lin.register_forward_pre_hook(self._make_hook(name)))

    def start_call(self, index: int, total: int) -> None:
        """Tell the observer which calibration call runs next (drives the fit/score split)."""
        self._call = index
        self._held_out = total > 1

    def _make_hook(self, name: str):
        def hook(_module: nn.Module, args: tuple) -> None:
            st = self.stats[name]
            x = args[0].detach().reshape(-1, st.in_features).float().cpu()
            neg = (-x).clamp(min=0).amax(dim=0)
            pos = x.clamp(min=0).amax(dim=0)
            st.pos_max = torch.maximum(st.pos_max, pos)
            st.neg_max = torch.maximum(st.neg_max, neg)
            fit = not self._held_out or self._call % 2 == 0
            if fit:
                st.fit_pos_max = pos if st.fit_pos_max is None else torch.maximum(st.fit_pos_max, pos)
                st.fit_neg_max = neg if st.fit_neg_max is None else torch.maximum(st.fit_neg_max, neg)
            if not self._held_out or not fit:
                n = min(self._rows_per_call, x.shape[0])
                idx = torch.randperm(x.shape[0], generator=self._gen)[:n]
                st.rows.append(x[idx].clone())
            if st.hessians is not None:
                xd = x.double()
                for (a, b), h in zip(st.hessian_bounds, st.hessians):
                    xs = xd[:, a:b]
                    h.addmm_(xs.t(), xs)
            st.count += x.shape[0]
        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self) -> InputObserver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()
