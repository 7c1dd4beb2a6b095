"""A peer's int8 build of a whole denoiser, standing in for the pipeline's own denoiser while it is timed.

``bench pipeline --peers`` times a peer end to end, in the same pipeline and loop as our variants. A peer
builds from fixed-shape keyword tensors (PT2E exports one graph, OpenVINO converts one model), so:

- the pipeline's recorded calibration calls (one prompt each) are stacked ``batch`` at a time into calls of
  the shape the timed pipeline makes (:func:`stack_calls`);
- the denoiser's non-tensor arguments (``return_dict``, ``joint_attention_kwargs=None``) are fixed when it
  is built (:class:`KeywordTensors`);
- :func:`install_peer` replaces the denoiser's ``forward`` on the instance with the peer's run. The module
  keeps its class, config and parameters, so pipelines that dispatch on the denoiser's type or read its
  dtype work unchanged (the float weights stay resident: a peer row reports speed and error, not memory).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from torch import nn

from segquant_core.bench.peers.base import Peer, PeerModel


class KeywordTensors(nn.Module):
    """``denoiser(**tensors, **constants, return_dict=False)[0]``: a forward of the named tensors only, the form
    both peers export and convert. Build it with :func:`keyword_tensors`, which gives ``forward`` a signature
    naming the tensors (OpenVINO orders dict inputs by the signature)."""

    def __init__(self, denoiser: nn.Module, names: Sequence[str], constants: dict[str, Any]) -> None:
        super().__init__()
        self.denoiser = denoiser
        self.names = list(names)
        self.constants = constants

    def forward(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:
        tensors = dict(zip(self.names, args, strict=False)) | kwargs
        return self.denoiser(**tensors, **self.constants, return_dict=False)[0]


def keyword_tensors(denoiser: nn.Module, names: Sequence[str], constants: dict[str, Any]) -> KeywordTensors:
    """A :class:`KeywordTensors` whose class's ``forward`` signature lists ``names``: a subclass made for the call,
    so the module holds no reference to itself (a cycle would leave the peer's runtime objects to the cyclic
    garbage collector, which may free them at any later time, on any thread)."""
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    params = [inspect.Parameter("self", kind), *(inspect.Parameter(n, kind) for n in names)]

    def forward(self: KeywordTensors, *args: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:
        return KeywordTensors.forward(self, *args, **kwargs)

    forward.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    named = type("KeywordTensors", (KeywordTensors,), {"forward": forward})
    return named(denoiser, names, constants)


def split_call(call: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensor arguments, other arguments) of a recorded call; ``return_dict`` is dropped (the peer's
    wrapper sets it). Tensors nested in containers cannot be fed to a fixed-input peer: ``ValueError``."""
    tensors, constants = {}, {}
    for name, value in call.items():
        if name == "return_dict":
            continue
        if isinstance(value, torch.Tensor):
            tensors[name] = value
        elif _holds_tensor(value):
            raise ValueError(f"argument {name!r} holds tensors inside a container; the peers take flat tensors only")
        else:
            constants[name] = value
    return tensors, constants


def _holds_tensor(value: Any) -> bool:
    if isinstance(value, dict):
        return any(_holds_tensor(v) for v in value.values())
    if isinstance(value, list | tuple):
        return any(_holds_tensor(v) for v in value)
    return isinstance(value, torch.Tensor)


def stack_calls(calls: Sequence[dict[str, torch.Tensor]], batch: int) -> list[dict[str, torch.Tensor]]:
    """Calls of ``batch`` recorded calls each, concatenated along the batch dimension.

    The batch size of a call is the first dimension of its first tensor (the noisy sample); tensors with
    that first dimension are concatenated, the others (Flux's position ids) must agree and are kept once.
    A remainder of fewer than ``batch`` calls is dropped."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    stacked = []
    for start in range(0, len(calls) - batch + 1, batch):
        group = calls[start : start + batch]
        rows = next(iter(group[0].values())).shape[0]
        merged = {}
        for name, first in group[0].items():
            if first.dim() > 0 and first.shape[0] == rows:
                merged[name] = torch.cat([c[name] for c in group])
            elif all(torch.equal(c[name], first) for c in group):
                merged[name] = first
            else:
                raise ValueError(f"argument {name!r} has no batch dimension and differs between calls")
        stacked.append(merged)
    return stacked


def build_peer_denoiser(
    peer: Peer, denoiser: nn.Module, calls: Sequence[dict[str, Any]], batch: int
) -> tuple[PeerModel, dict[str, Any]]:
    """The peer's build of fp32 ``denoiser`` for calls of ``batch`` recorded calls, calibrated on all of them
    (stacked); returns it with the non-tensor arguments it was built for."""
    split = [split_call(c) for c in calls]
    constants = split[0][1]
    if any(c != constants for _, c in split):
        raise ValueError("the recorded calls differ in their non-tensor arguments")
    stacked = stack_calls([t for t, _ in split], batch)
    if not stacked:
        raise ValueError(f"{len(calls)} recorded calls are fewer than one batch of {batch}")
    module = keyword_tensors(denoiser.float().eval(), list(stacked[0]), constants).eval()
    return peer.build(module, stacked[0], stacked), constants


def install_peer(denoiser: nn.Module, built: PeerModel, constants: dict[str, Any]) -> None:
    """Route ``denoiser``'s calls to the peer: same arguments in, the output in the denoiser's dtype out
    (a ``Transformer2DModelOutput`` unless ``return_dict=False``, as diffusers denoisers answer)."""
    signature = inspect.signature(type(denoiser).forward)
    dtype = next(denoiser.parameters()).dtype

    def forward(*args: Any, **kwargs: Any) -> Any:  # holds no reference to ``denoiser``: no cycle through it
        bound = signature.bind(None, *args, **kwargs).arguments
        bound.pop("self", None)
        return_dict = bound.pop("return_dict", True)
        tensors, others = split_call(bound)
        if others != constants:
            raise ValueError(f"the peer was built for arguments {constants}, called with {others}")
        out = built.run(tensors)[0].to(dtype)
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)

    denoiser.forward = forward  # type: ignore[method-assign]


def uninstall_peer(denoiser: nn.Module) -> None:
    """Back to the denoiser's own ``forward``, dropping the peer's runtime now (a pipeline may sit in reference
    cycles and live until the cyclic collector runs, on whatever thread, holding the peer's native objects)."""
    denoiser.__dict__.pop("forward", None)
