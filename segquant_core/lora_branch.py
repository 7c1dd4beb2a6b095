"""The per-layer LoRA side branch: the active pairs stacked, one down GEMM shared by sibling layers, one add.

Cost model (why it is built this way): at rank 16 next to a 1536-wide layer the branch is ~2 % of the
layer's MACs, so what it really costs is the number of extra kernel calls (each a parallel region and a
pass over the activations), not arithmetic. Per adapted layer the branch therefore makes at most two
calls, whatever the number of active adapters:

* ``x · Aᵀ`` over all active adapters' ranks at once (their ``A`` stacked to ``[R, in]``), and for sibling
  layers that read the very same input tensor (attention ``to_q``/``to_k``/``to_v``, and the context
  stream's ``add_*_proj``) one GEMM over the siblings' concatenated ranks, computed by the first sibling
  and sliced by the others;
* ``y += (x Aᵀ) · Bᵀ`` as one ``addmm_`` into the layer's fresh output (scales and alpha/r folded into
  ``B``), instead of a GEMM, a cast and an add.

The branch runs in the input's dtype (bf16 with a bf16 model), on the raw input the layer receives.
Sharing is checked on every call (same tensor object, same version); a group whose members turn out to
see different inputs (a cross-attention ``to_k`` reads the text, ``to_q`` the image) stops sharing for
good, so the grouping by name is only ever a speed guess, never a correctness one. Under ``torch.compile`` the
same sharing is traced by tensor identity within the graph (no version counters), so an adapted denoiser
still compiles as one graph with one stacked down GEMM per sibling group.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from segquant_core.lora_keys import LoraPair

# Sibling linears of one attention module that diffusers' processors call on one input tensor.
SHARED_INPUT_SIBLINGS: tuple[frozenset[str], ...] = (
    frozenset({"to_q", "to_k", "to_v"}),
    frozenset({"add_q_proj", "add_k_proj", "add_v_proj"}),
)

_Key = tuple[torch.device, torch.dtype]


class LayerSlot:
    """Adapters of one layer and the stacked pair of the active ones (not a Module: stays out of state_dict)."""

    def __init__(self, in_features: int) -> None:
        self.in_features = in_features
        self.pairs: dict[str, LoraPair] = {}
        self.down: torch.Tensor | None = None  # [R, in], active adapters stacked
        self.up_t: torch.Tensor | None = None  # [R, out], each adapter's scale · alpha/r folded in
        self.group: SharedDown | None = None
        self.span: tuple[int, int] = (0, 0)  # this layer's columns in its group's stacked down GEMM
        self._cast: dict[_Key, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def rank(self) -> int:
        return 0 if self.down is None else int(self.down.shape[0])

    def activate(self, scales: dict[str, float]) -> None:
        """Stack the pairs of the adapters in ``scales`` (non-zero scale) into one ``down`` / ``up_t``."""
        live = [(self.pairs[n], s) for n, s in scales.items() if n in self.pairs and s != 0.0]
        self._cast = {}
        if not live:
            self.down = self.up_t = None
            return
        self.down = torch.cat([p.down for p, _ in live], 0)
        self.up_t = torch.cat([p.up.t() * (s * p.scale) for p, s in live], 0).contiguous()

    def delta_weight(self) -> torch.Tensor | None:
        """``[out, in]`` update of the active adapters (for fusing into a float weight)."""
        if self.down is None or self.up_t is None:
            return None
        return self.up_t.t() @ self.down

    def _weights(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key = (x.device, x.dtype)
        if key not in self._cast:
            assert self.down is not None and self.up_t is not None
            self._cast[key] = (self.down.to(x.device, x.dtype), self.up_t.to(x.device, x.dtype))
        return self._cast[key]

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """``x Aᵀ`` for this layer alone: ``[…, R]``."""
        return F.linear(x, self._weights(x)[0])

    def apply(self, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """``output + x Aᵀ Bᵀ``; in place when ``output`` is a fresh contiguous tensor outside autograd."""
        if self.down is None:
            return output
        xa = self.group.project(self, x) if self.group is not None else self.project(x)
        up_t = self._weights(x)[1]
        xa2d = xa.reshape(-1, xa.shape[-1])
        if output.dtype == up_t.dtype and output.is_contiguous() and not output.requires_grad:
            output.view(-1, output.shape[-1]).addmm_(xa2d, up_t)
            return output
        return output + (xa2d @ up_t).reshape(output.shape).to(output.dtype)


class SharedDown:
    """Sibling layers that read one input tensor: one down GEMM over their concatenated ranks per call.

    The first member called computes ``x · [A_1; A_2; …]ᵀ`` and keeps it (with a reference to ``x``) until
    every active member has taken its columns; a member that arrives with another tensor while others are
    still pending proves the siblings see different inputs, and the group stops sharing.
    """

    def __init__(self, members: list[LayerSlot]) -> None:
        self.members = members
        self.shared = True
        self._down: torch.Tensor | None = None
        self._spans: dict[int, tuple[int, int]] = {}
        self._cast: dict[_Key, torch.Tensor] = {}
        self._clear()

    def _clear(self) -> None:
        self._traced_x: torch.Tensor | None = None  # the same cache as traced by Dynamo (see _project_traced)
        self._traced_xa: torch.Tensor | None = None
        self._traced_left = 0
        self._x: torch.Tensor | None = None
        self._version = -1
        self._xa: torch.Tensor | None = None
        self._pending: set[int] = set()

    def rebuild(self) -> None:
        """Restack after the members' active pairs changed."""
        self._clear()
        self._cast = {}
        live = [m for m in self.members if m.down is not None]
        self._down = torch.cat([m.down for m in live], 0) if len(live) > 1 else None  # type: ignore[misc]
        self._spans, lo = {}, 0
        for m in live:
            self._spans[id(m)] = m.span = (lo, lo + m.rank)
            lo += m.rank

    def shares(self, slot: LayerSlot) -> bool:
        """Whether ``slot``'s down projection currently comes from the group's stacked GEMM."""
        return self.shared and self._down is not None and id(slot) in self._spans

    def project(self, slot: LayerSlot, x: torch.Tensor) -> torch.Tensor:
        """``x A_slotᵀ``, from the group's shared GEMM when the siblings see this same ``x``."""
        if not self.shared or self._down is None:
            return slot.project(x)
        if torch.compiler.is_compiling():
            return self._project_traced(slot, x)
        me = id(slot)
        if not (self._x is x and self._version == x._version and me in self._pending):
            if self._pending:  # a sibling is still waiting for the previous input: inputs differ
                self.shared = False
                self._clear()
                return slot.project(x)
            key = (x.device, x.dtype)
            if key not in self._cast:
                self._cast[key] = self._down.to(x.device, x.dtype)
            self._x, self._version = x, x._version
            self._xa = F.linear(x, self._cast[key])
            self._pending = set(self._spans)
        assert self._xa is not None
        lo, hi = self._spans[me]
        xa = self._xa[..., lo:hi]
        self._pending.discard(me)
        if not self._pending:
            self._clear()
        return xa

    def _project_traced(self, slot: LayerSlot, x: torch.Tensor) -> torch.Tensor:
        """The sharing as Dynamo can trace it: tensor identity within one graph (no version counters, no
        ``id()``). The last member's call clears the cache, so nothing outlives the graph and no guard
        changes between calls; siblings that turn out to see different inputs stop sharing (one recompile)."""
        lo, hi = slot.span
        if self._traced_x is not x:
            if self._traced_left:  # a sibling still waits for the previous input: inputs differ
                self.shared = False
                self._clear()
                return slot.project(x)
            self._traced_x, self._traced_left = x, len(self._spans)
            self._traced_xa = F.linear(x, self._down.to(x.device, x.dtype))  # type: ignore[union-attr]
        xa = self._traced_xa[..., lo:hi]  # type: ignore[index]
        self._traced_left -= 1
        if not self._traced_left:
            self._traced_x = self._traced_xa = None
        return xa


def group_siblings(slots: dict[str, LayerSlot]) -> None:
    """(Re)build the shared-input groups among ``slots`` (module name → slot) and restack them."""
    for slot in slots.values():
        slot.group = None
    by_parent: dict[tuple[str, frozenset[str], int], list[LayerSlot]] = {}
    for name, slot in slots.items():
        parent, _, child = name.rpartition(".")
        for siblings in SHARED_INPUT_SIBLINGS:
            if child in siblings:  # equal widths only: a cross-attention to_k may read a narrower context
                by_parent.setdefault((parent, siblings, slot.in_features), []).append(slot)
    for members in by_parent.values():
        if len(members) > 1:
            group = SharedDown(members)
            for m in members:
                m.group = group
            group.rebuild()
