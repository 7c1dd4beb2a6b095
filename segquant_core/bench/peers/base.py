"""What every CPU peer of the benchmarks provides: build a float module into the peer's int8 form, then run it.

A peer is another runtime a CPU user could pick instead of ours (PyTorch PT2E, OpenVINO). The benches hand it
the same float module, example inputs and calibration inputs our variants get, and time the callable it
returns in the same alternating loop, so its ratios and output error read exactly like ours.
"""

from __future__ import annotations

import importlib.util
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

# The optional dependency group that installs every peer.
PEERS_EXTRA = "peers"


class PeerUnavailable(RuntimeError):
    """A peer's packages are not installed; the message says which and how to install them."""


@dataclass
class PeerModel:
    """A module built by a peer: ``call()`` runs it on the prepared example inputs, ``run(inputs)`` on new
    keyword inputs of the example's shapes (what a pipeline's denoising loop needs)."""

    call: Callable[[], tuple[torch.Tensor, ...]]  # outputs in the module's order, as torch tensors
    run: Callable[[dict[str, torch.Tensor]], tuple[torch.Tensor, ...]]
    int8_linears: int  # linears the peer's compiled form runs in int8 (read from the artefact, not assumed)
    linears: int  # linears in the float module: the scope the peer was asked to quantize


class Peer(ABC):
    """One peer runtime: ``build`` quantizes and compiles a float module; the result is timed like ours."""

    name: ClassVar[str]  # what ``--peers`` calls it
    label: ClassVar[str]  # its row label in the tables
    packages: ClassVar[tuple[str, ...]]  # importable modules it needs (all from the ``peers`` extra)

    @classmethod
    def missing_packages(cls) -> list[str]:
        return [p for p in cls.packages if importlib.util.find_spec(p) is None]

    @classmethod
    def require(cls) -> None:
        """Raise :class:`PeerUnavailable` (one line naming the extra) when a package is missing."""
        missing = cls.missing_packages()
        if missing:
            raise PeerUnavailable(
                f"peer {cls.name!r} needs {', '.join(missing)}: pip install 'segquant-serve[{PEERS_EXTRA}]'"
            )

    @abstractmethod
    def build(
        self, module: nn.Module, example: dict[str, torch.Tensor], calibration: list[dict[str, torch.Tensor]]
    ) -> PeerModel:
        """Quantize ``module`` (fp32, eval) with the peer's own calibration on ``calibration`` (keyword inputs)
        and compile it for ``example``; activations between the int8 linears run in bf16, as ours do."""


def count_linears(module: nn.Module) -> int:
    return sum(isinstance(m, nn.Linear) for m in module.modules())


def as_tuple(out: object) -> tuple[torch.Tensor, ...]:
    """A module's output (tensor, tuple or list of tensors) as a tuple of tensors."""
    if isinstance(out, torch.Tensor):
        return (out,)
    if isinstance(out, tuple | list) and all(isinstance(t, torch.Tensor) for t in out):
        return tuple(out)
    raise TypeError(f"a peer's module must return tensors, got {type(out).__name__}")
