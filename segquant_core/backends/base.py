"""The seam between :class:`~segquant_core.seglinear.SegLinear` and the kernels that run it.

A backend answers three questions: can it run this layer here (``unsupported_reason``), what does it
precompute once per layer (``prepare``: prepacked weights, scale vectors), and how does it compute
``y = layer(x)`` for a 2-D input (``run``). Every backend must agree with :mod:`.reference`
(fake-quantization in fp32), which is the ground truth the tests hold the others to.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from segquant_core.seglinear import SegLinear


class Backend(ABC):
    """One execution path for SegLinear layers."""

    name: str = "abstract"

    @classmethod
    def available(cls) -> bool:
        """Whether this backend can run at all on this machine/build."""
        return True

    @abstractmethod
    def unsupported_reason(self, layer: SegLinear) -> str | None:
        """``None`` if the backend can run ``layer`` where it lives now, else a short reason."""

    def prepare(self, layer: SegLinear) -> Any:
        """Precompute per-layer state (called on selection and after ``.to()``)."""
        return None

    @abstractmethod
    def run(self, layer: SegLinear, state: Any, x: torch.Tensor) -> torch.Tensor:
        """``x [M, K]`` → ``y [M, N]`` (bias included), in fp32 or the input dtype."""

    # One resident copy of each weight: a backend whose prepared state can give the codes back lets the
    # layer drop its own copy (SegLinear.release_codes).
    def holds_codes(self, state: Any) -> bool:
        """Whether ``state`` can give back every segment's weight codes (:meth:`recover_codes`)."""
        return False

    def recover_codes(self, layer: SegLinear, state: Any) -> list[torch.Tensor] | None:
        """Each segment's weight codes in their stored form (packed int4 as uint8), or None if unknown."""
        return None

    def state_bytes(self, state: Any, seen: set[int]) -> int:
        """Bytes held by the prepared state that the layer's buffers do not already hold."""
        return 0

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"
