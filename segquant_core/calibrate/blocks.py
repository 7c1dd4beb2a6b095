"""The units of block-sequential calibration: a denoiser's blocks, plus every linear outside them.

A *block* is what a denoiser runs as one step of its stack:

* every element of a ``nn.ModuleList`` that is a direct child of the denoiser — SD3/SD3.5
  ``transformer_blocks`` (``JointTransformerBlock``, dual-attention ones included), Flux
  ``transformer_blocks`` and ``single_transformer_blocks``, PixArt/Sana ``transformer_blocks``
  (``BasicTransformerBlock`` / ``SanaTransformerBlock``), UNet ``down_blocks`` and ``up_blocks``;
* a direct child whose class name contains ``Block`` (a UNet's ``mid_block``).

Every target linear outside those blocks (timestep/text embedders, ``context_embedder``, AdaLN-single,
``norm_out.linear``, ``proj_out``) is a unit of its own. Blocks without a target linear are not units:
calibration has nothing to do there. The execution order (UNet: down, mid, up — skips are carried by the
model's own forward) is not guessed from the module tree: :func:`execution_order` records it from a
forward pass, and the block-sequential runner follows whatever order the model's forward takes.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class Unit:
    """One step of block-sequential calibration: a module and the target linears inside it."""

    name: str
    module: nn.Module
    layers: tuple[str, ...]


def _blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    found: list[tuple[str, nn.Module]] = []
    for child_name, child in model.named_children():
        if isinstance(child, nn.ModuleList):
            found += [(f"{child_name}.{i}", block) for i, block in enumerate(child)]
        elif "Block" in type(child).__name__:
            found.append((child_name, child))
    return found


def find_units(model: nn.Module, targets: Iterable[str]) -> list[Unit]:
    """The sequencing units of ``model`` that hold at least one of ``targets`` (module order)."""
    wanted = list(targets)
    claimed: set[str] = set()
    units: list[Unit] = []
    for name, block in _blocks(model):
        inside = tuple(t for t in wanted if t.startswith(name + "."))
        if inside:
            units.append(Unit(name, block, inside))
            claimed.update(inside)
    modules = dict(model.named_modules())
    for t in wanted:
        if t not in claimed:
            units.append(Unit(t, modules[t], (t,)))
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    return sorted(units, key=lambda u: order[u.name])


def execution_order(model: nn.Module, units: list[Unit], call: dict[str, Any]) -> list[str]:
    """Names of ``units`` in the order ``model(**call)`` first enters them (one float forward pass)."""
    seen: list[str] = []
    handles = []
    for unit in units:

        def hook(_m: nn.Module, _args: tuple, name: str = unit.name) -> None:
            if name not in seen:
                seen.append(name)

        handles.append(unit.module.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            model(**call)
    finally:
        for h in handles:
            h.remove()
    return seen


__all__ = ["Unit", "execution_order", "find_units"]
