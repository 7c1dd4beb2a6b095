"""Per-layer input statistics, gathered by forward pre-hooks while calibration calls run.

For every watched layer we keep, over all calibration inputs:

* the per-input-channel positive max and negative magnitude max — enough to compute the static
  activation scale (single or DualScale) of *any* smoothing vector without re-running the model, because
  ``max(x / s) = max_c(max_c(x) / s_c)`` for ``s > 0``;
* a seeded sample of input rows on which the α search is scored. With more than one calibration call the
  search is *held out*: candidate scales come from the even-numbered calls' maxima (``fit_*``) and are
  scored on rows of the odd-numbered calls, so an α that merely fits the calibration maxima (α → 1
  normalises every channel to exactly its observed max) does not win by clipping unseen inputs;
* optionally the GPTQ Hessian ``Σ xxᵀ`` (full for out-segments, one block per in-segment).

Everything stays on the device the activations come from (no host copies of GPU activations) and is fp32:
maxima are exact in any dtype, sampled rows are the inputs themselves, and an fp32 ``Σ xxᵀ`` is what GPTQ
implementations use. Each layer draws its row sample from its own generator (seeded by the layer name),
so the rows do not depend on the order in which layers are observed — block-sequential and whole-model
calibration see the same rows. Linears that read the very same input tensor (q, k and v) share one
Hessian, accumulated once.
"""

from __future__ import annotations

import weakref
import zlib
from dataclasses import dataclass, field

import torch
from torch import nn

from segquant_core.detect.plan import Segments

# Rows converted to fp32 at a time when accumulating a Hessian: bounds the temporary at real sizes.
_HESSIAN_CHUNK_ROWS = 2048


@dataclass
class InputStats:
    in_features: int
    pos_max: torch.Tensor  # [K] max of x⁺ per channel
    neg_max: torch.Tensor  # [K] max of |x⁻| per channel
    fit_pos_max: torch.Tensor | None = None  # the same over the even-numbered calls only
    fit_neg_max: torch.Tensor | None = None
    rows: list[torch.Tensor] = field(default_factory=list)
    hessians: list[torch.Tensor] | None = None  # Σ xxᵀ, one per block (see ``hessian_bounds``)
    hessian_bounds: list[tuple[int, int]] = field(default_factory=list)
    hessian_source: str | None = None  # the layer whose Hessian this one shares (same input tensor)
    count: int = 0  # rows seen

    @property
    def abs_max(self) -> torch.Tensor:
        return torch.maximum(self.pos_max, self.neg_max)

    def sample(self) -> torch.Tensor:
        if self.rows:
            return torch.cat(self.rows)
        return torch.zeros(0, self.in_features, device=self.pos_max.device)

    def hessian_sum(self, a: int, b: int) -> torch.Tensor:
        """``Σ xxᵀ`` over input columns ``[a, b)`` — a view, not a copy (divide by :attr:`count`)."""
        if self.hessians is None:
            raise ValueError("no Hessian was collected (GPTQ was not requested for this layer)")
        for (lo, hi), h in zip(self.hessian_bounds, self.hessians):
            if lo <= a and b <= hi:
                return h[a - lo : b - lo, a - lo : b - lo]
        raise ValueError(f"no Hessian block covers columns [{a}, {b})")

    def hessian(self, a: int, b: int) -> torch.Tensor:
        """Mean ``xxᵀ`` over input columns ``[a, b)`` (a new tensor)."""
        return self.hessian_sum(a, b) / max(self.count, 1)


def _layer_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


class InputObserver:
    """Forward pre-hooks that fill an :class:`InputStats` per watched linear layer."""

    def __init__(
        self,
        layers: dict[str, nn.Linear],
        *,
        rows_per_call: int,
        seed: int = 0,
        hessian_for: dict[str, Segments | None] | None = None,
        hooks: bool = True,
    ) -> None:
        """``hooks=False`` registers nothing: the caller feeds inputs through :meth:`observe`."""
        self.stats: dict[str, InputStats] = {}
        self._handles: list = []
        self._gens = {name: torch.Generator().manual_seed(_layer_seed(seed, name)) for name in layers}
        self._rows_per_call = rows_per_call
        self._call = 0
        self._held_out = False
        self._hessian_for = hessian_for or {}
        # id(input tensor) → (weak reference, first GPTQ layer that read it in this call)
        self._call_inputs: dict[int, tuple[weakref.ref, str]] = {}
        for name, lin in layers.items():
            k = lin.in_features
            device = lin.weight.device
            self.stats[name] = InputStats(k, torch.zeros(k, device=device), torch.zeros(k, device=device))
            if hooks:
                self._handles.append(lin.register_forward_pre_hook(self._make_hook(name)))

    def start_call(self, index: int, total: int) -> None:
        """Tell the observer which calibration call runs next (drives the fit/score split)."""
        self._call = index
        self._held_out = total > 1
        self._call_inputs.clear()

    def _bounds(self, name: str, k: int) -> list[tuple[int, int]]:
        seg = self._hessian_for[name]
        return seg.bounds() if (seg is not None and seg.axis == "in") else [(0, k)]

    def _accumulate_hessian(self, name: str, st: InputStats, x_in: torch.Tensor, x: torch.Tensor) -> None:
        # The same tensor *object* (kept alive by the caller, so its id is not reused) means the same input.
        ref, first = self._call_inputs.get(id(x_in), (None, name))
        if ref is None or ref() is not x_in:
            self._call_inputs[id(x_in)] = (weakref.ref(x_in), name)
            first = name
        if st.hessians is None:
            bounds = self._bounds(name, st.in_features)
            other = self.stats[first] if first != name else None
            if (
                other is not None
                and other.hessians is not None
                and other.hessian_bounds == bounds
                and other.hessian_source is None
                and other.count - x.shape[0] == st.count
            ):
                st.hessians, st.hessian_bounds, st.hessian_source = other.hessians, bounds, first
                return
            st.hessians = [torch.zeros(b - a, b - a, device=x.device) for a, b in bounds]
            st.hessian_bounds = bounds
        elif st.hessian_source is not None:
            if first != st.hessian_source:
                raise RuntimeError(
                    f"{name} shares the Hessian of {st.hessian_source}, but in calibration "
                    f"call {self._call} the two layers read different inputs"
                )
            return
        for r0 in range(0, x.shape[0], _HESSIAN_CHUNK_ROWS):
            chunk = x[r0 : r0 + _HESSIAN_CHUNK_ROWS]
            for (a, b), h in zip(st.hessian_bounds, st.hessians):
                xs = chunk[:, a:b].float()
                h.addmm_(xs.t(), xs)

    def _make_hook(self, name: str):
        def hook(_module: nn.Module, args: tuple) -> None:
            self.observe(name, args[0])

        return hook

    def observe(self, name: str, x_in: torch.Tensor) -> None:
        """Add one input of layer ``name`` (any leading shape, last dim = in_features) to its statistics."""
        st = self.stats[name]
        x = x_in.detach().reshape(-1, st.in_features)
        # max(x⁺) = max(max(x), 0): exact in the input's own dtype, so no fp32 copy of x is made
        pos = x.amax(dim=0).float().clamp(min=0)
        neg = (-x.amin(dim=0).float()).clamp(min=0)
        st.pos_max = torch.maximum(st.pos_max, pos)
        st.neg_max = torch.maximum(st.neg_max, neg)
        fit = not self._held_out or self._call % 2 == 0
        if fit:
            st.fit_pos_max = pos if st.fit_pos_max is None else torch.maximum(st.fit_pos_max, pos)
            st.fit_neg_max = neg if st.fit_neg_max is None else torch.maximum(st.fit_neg_max, neg)
        if not self._held_out or not fit:
            n = min(self._rows_per_call, x.shape[0])
            idx = torch.randperm(x.shape[0], generator=self._gens[name])[:n]
            st.rows.append(x[idx.to(x.device)].float())
        if name in self._hessian_for:
            self._accumulate_hessian(name, st, x_in, x)
        st.count += x.shape[0]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self) -> InputObserver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()
