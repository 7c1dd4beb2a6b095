"""LoRA adapters on any variant (float or quantized) as a float side branch next to the layer.

For every adapted layer (``nn.Linear`` or :class:`SegLinear`) the output becomes

    y = layer(x) + Σ_a scale_a · B_a (A_a x)

where ``x`` is the layer's own (raw, unsmoothed, unquantized) input, so the quantized codes, scales and
smoothing vectors are never touched and any recipe keeps working. The branch is a forward hook: the layer
classes do not change, ``state_dict`` / artifacts do not see adapters, and removing the last adapter
removes the hook.

Serving pattern (one worker, many requests): ``load_lora`` every adapter once (``activate=False``), then per
batch ``set_adapters(model, {"name": scale, …})``. That call stacks the active pairs of each layer into one
``[R, in]`` / ``[out, R]`` pair (scales folded into ``B``), so a batch with any number of adapters costs two
small GEMMs per layer; setting the same adapters and scales again is a no-op. ``set_adapters(model, {})``
turns every adapter off without unloading it.

Adapters must be loaded after quantization: quantizing swaps modules and would drop their hooks.
"""

from __future__ import annotations

import difflib
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from segquant_core.lora_branch import LayerSlot, group_siblings
from segquant_core.lora_keys import LoraError, LoraPair, read_pairs
from segquant_core.seglinear import SegLinear

logger = logging.getLogger(__name__)

_SLOT_ATTR = "_segquant_lora_slot"
_HANDLE_ATTR = "_segquant_lora_hook"
_REGISTRY_ATTR = "_segquant_loras"


@dataclass(frozen=True)
class LoraInfo:
    """What one loaded adapter is: its file, the layers it adapts, its largest rank."""

    name: str
    path: Path
    layers: tuple[str, ...]
    rank: int
    params: int


def _hook(
    module: nn.Module, args: tuple[torch.Tensor, ...], kwargs: dict[str, torch.Tensor], output: torch.Tensor
) -> torch.Tensor:
    slot: LayerSlot = module.__dict__[_SLOT_ATTR]
    return slot.apply(args[0] if args else kwargs["input"], output)


def _registry(model: nn.Module) -> dict[str, LoraInfo]:
    return model.__dict__.setdefault(_REGISTRY_ATTR, {})


def _active(model: nn.Module) -> dict[str, float]:
    return model.__dict__.setdefault("_segquant_lora_active", {})


def _adaptable(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear | SegLinear)}


def _slots(model: nn.Module) -> dict[str, LayerSlot]:
    """Every adapted layer's slot, by module name."""
    return {n: m.__dict__[_SLOT_ATTR] for n, m in _adaptable(model).items() if _SLOT_ATTR in m.__dict__}


def _restack(model: nn.Module, scales: dict[str, float]) -> None:
    """Activate ``scales`` in every slot, then rebuild the shared-input groups over the result."""
    slots = _slots(model)
    for slot in slots.values():
        slot.activate(scales)
    group_siblings(slots)


def _match(raw_name: str, layers: dict[str, nn.Module], kohya: dict[str, str] | None, file: Path) -> str:
    name = kohya.get(raw_name, raw_name) if kohya is not None else raw_name
    if name in layers:
        return name
    pool = list(kohya) if kohya is not None else list(layers)
    near = difflib.get_close_matches(raw_name, pool, n=3)
    hint = f"; nearest layers: {', '.join(near)}" if near else ""
    raise LoraError(f"{file}: LoRA module {raw_name!r} matches no linear layer of this model{hint}")


def load_lora(
    model: nn.Module,
    path: str | Path,
    name: str,
    *,
    scale: float = 1.0,
    activate: bool = True,
    skip_text_encoder: bool = False,
) -> LoraInfo:
    """Read a LoRA file and attach it to ``model`` (a denoiser) under ``name``.

    Every key is matched and every shape checked before anything is attached, so a bad file leaves the
    model untouched. With ``activate`` the adapter joins the active set at ``scale``.
    """
    if not name or not isinstance(name, str):
        raise LoraError("an adapter needs a non-empty name")
    if name in _registry(model):
        raise LoraError(f"an adapter named {name!r} is already loaded; unload_lora it first")
    if not math.isfinite(scale):
        raise LoraError(f"scale must be a finite number, got {scale}")
    raw = read_pairs(path, skip_text_encoder=skip_text_encoder)
    layers = _adaptable(model)
    kohya = {n.replace(".", "_"): n for n in layers} if raw.kohya else None
    placed: dict[str, LoraPair] = {}
    for raw_name, pair in raw.pairs.items():
        target = _match(raw_name, layers, kohya, raw.path)
        layer = layers[target]
        want_in, want_out = int(layer.in_features), int(layer.out_features)
        if pair.down.shape[1] != want_in or pair.up.shape[0] != want_out:
            raise LoraError(
                f"{raw.path}: LoRA module {raw_name!r} is {pair.up.shape[0]}x{pair.down.shape[1]} "
                f"(out x in) but layer {target!r} is {want_out}x{want_in}"
            )
        placed[target] = pair
    for target, pair in placed.items():
        layer = layers[target]
        slot = layer.__dict__.get(_SLOT_ATTR)
        if slot is None:
            slot = LayerSlot(int(layer.in_features))
            layer.__dict__[_SLOT_ATTR] = slot
            layer.__dict__[_HANDLE_ATTR] = layer.register_forward_hook(_hook, with_kwargs=True)
        slot.pairs[name] = pair
    info = LoraInfo(
        name,
        raw.path,
        tuple(sorted(placed)),
        max(p.rank for p in placed.values()),
        sum(p.down.numel() + p.up.numel() for p in placed.values()),
    )
    _registry(model)[name] = info
    if raw.skipped:
        logger.info("lora %s: skipped %d text-encoder keys", name, len(raw.skipped))
    if activate:
        set_adapters(model, {**_active(model), name: scale})
    else:
        _restack(model, _active(model))
    return info


def set_adapters(model: nn.Module, scales: dict[str, float]) -> None:
    """Make exactly ``scales`` the active adapters (``{}``: none). Same set and scales again: no work."""
    known = _registry(model)
    unknown = [n for n in scales if n not in known]
    if unknown:
        raise LoraError(
            f"unknown adapter(s) {', '.join(map(repr, unknown))}; loaded: {', '.join(sorted(known)) or 'none'}"
        )
    bad = [n for n, s in scales.items() if not isinstance(s, int | float) or not math.isfinite(s)]
    if bad:
        raise LoraError(f"adapter scale must be a finite number: {', '.join(f'{n}={scales[n]!r}' for n in bad)}")
    want = {n: float(s) for n, s in scales.items()}
    if want == _active(model):
        return
    _restack(model, want)
    model.__dict__["_segquant_lora_active"] = want


def active_adapters(model: nn.Module) -> dict[str, float]:
    """The active adapters and their scales."""
    return dict(_active(model))


def list_loras(model: nn.Module) -> dict[str, LoraInfo]:
    """Every loaded adapter, active or not."""
    return dict(_registry(model))


def shared_down_groups(model: nn.Module) -> list[tuple[str, ...]]:
    """Layers whose active adapters share one down-projection GEMM (attention siblings reading one input).

    A group drops out of this list for good once a forward shows its members read different tensors.
    """
    groups: dict[int, list[str]] = {}
    for name, slot in _slots(model).items():
        if slot.group is not None and slot.group.shares(slot):
            groups.setdefault(id(slot.group), []).append(name)
    return sorted(tuple(sorted(names)) for names in groups.values() if len(names) > 1)


def unload_lora(model: nn.Module, name: str | None = None) -> None:
    """Remove one adapter (``None``: all). A layer left without adapters gets its hook removed."""
    known = _registry(model)
    names = list(known) if name is None else [name]
    for n in names:
        if n not in known:
            raise LoraError(f"no adapter named {n!r} is loaded; loaded: {', '.join(sorted(known)) or 'none'}")
    active = {k: v for k, v in _active(model).items() if k not in names}
    for layer in _adaptable(model).values():
        slot = layer.__dict__.get(_SLOT_ATTR)
        if slot is None:
            continue
        for n in names:
            slot.pairs.pop(n, None)
        if not slot.pairs:
            layer.__dict__.pop(_HANDLE_ATTR).remove()
            del layer.__dict__[_SLOT_ATTR]
    for n in names:
        del known[n]
    _restack(model, active)
    model.__dict__["_segquant_lora_active"] = active


@torch.no_grad()
def fuse_lora(model: nn.Module) -> list[str]:
    """Fold the active adapters into the float weights of plain ``nn.Linear`` layers, then unload all.

    This is the merge-then-requantize path (quantize the fused float model afterwards), kept as the
    reference the side branch is compared with. Quantized layers cannot be fused: their codes stay as built.
    """
    live = {
        n: (m, m.__dict__[_SLOT_ATTR])
        for n, m in _adaptable(model).items()
        if _SLOT_ATTR in m.__dict__ and m.__dict__[_SLOT_ATTR].down is not None
    }
    quantized = [n for n, (m, _) in live.items() if not isinstance(m, nn.Linear)]
    if quantized:
        raise LoraError(
            f"layer {quantized[0]!r} is quantized ({type(live[quantized[0]][0]).__name__}); fuse "
            f"adapters into the float model before quantizing"
        )
    for layer, slot in live.values():
        layer.weight += slot.delta_weight().to(layer.weight.device, layer.weight.dtype)
    unload_lora(model)
    return sorted(live)


__all__ = [
    "LoraError",
    "LoraInfo",
    "active_adapters",
    "fuse_lora",
    "list_loras",
    "load_lora",
    "set_adapters",
    "shared_down_groups",
    "unload_lora",
]
