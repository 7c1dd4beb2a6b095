"""LoRA adapters on one loaded variant's denoiser: loaded on first use, at most N kept (LRU), one set per call.

Every variant has a denoiser of its own (float or quantized), so each keeps its own adapters; the shared
pipeline parts (text encoders, VAE) never carry any. Adapters hook the denoiser's linears through
``segquant_core``'s public API, which leaves quantized codes untouched, so unloading one restores the
variant exactly. A call activates exactly its batch's set (``{}``: none); the same set again costs nothing.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import torch

import segquant_core as sq
from service.registry import ModelSpec

logger = logging.getLogger(__name__)


class AdapterLoadError(RuntimeError):
    """An adapter the registry lists could not be loaded into this denoiser (missing or mismatched file)."""


class DenoiserAdapters:
    """The adapters loaded into one denoiser, least recently used first."""

    def __init__(self, model: ModelSpec, owner: str, capacity: int) -> None:
        self.model, self.owner, self.capacity = model, owner, capacity  # owner: the variant, for log lines
        self._lru: OrderedDict[str, None] = OrderedDict()

    @property
    def loaded(self) -> list[str]:
        """Loaded adapter names, least recently used first."""
        return list(self._lru)

    def activate(self, denoiser: torch.nn.Module, scales: dict[str, float]) -> list[str]:
        """Make exactly ``scales`` the active adapters, loading the missing ones first; returns those loaded now.

        ``denoiser`` is the variant's own (not kept here, so unloading the variant frees it). Blocking (reads
        files); the caller holds the variant's lock, so no call runs on this denoiser meanwhile.
        """
        loaded_now: list[str] = []
        for name in scales:
            if name in self._lru:
                self._lru.move_to_end(name)
                continue
            self._make_room(denoiser, keep=scales)
            self._load(denoiser, name)
            loaded_now.append(name)
        sq.set_adapters(denoiser, scales)
        return loaded_now

    def _load(self, denoiser: torch.nn.Module, name: str) -> None:
        spec = self.model.adapter(name)
        path = spec.local_path()
        if path is None:
            raise AdapterLoadError(
                f"adapter {name!r} of model {self.model.name!r}: {spec.path} cannot be located "
                "on this worker (segquant_shapes is not installed)"
            )
        try:
            info = sq.load_lora(denoiser, path, name, activate=False)
        except (sq.LoraError, OSError) as e:
            raise AdapterLoadError(f"adapter {name!r} of model {self.model.name!r} could not be loaded: {e}") from e
        self._lru[name] = None
        logger.info(
            "loaded adapter %s into %s (%d layers, rank %d, %s parameters)",
            name,
            self.owner,
            len(info.layers),
            info.rank,
            f"{info.params:,}",
        )

    def _make_room(self, denoiser: torch.nn.Module, *, keep: dict[str, float]) -> None:
        """Unload least recently used adapters not in ``keep`` until one more fits."""
        while len(self._lru) >= self.capacity:
            victim = next((n for n in self._lru if n not in keep), None)
            if victim is None:  # the settings keep the cache at least as large as one request's set
                return
            sq.unload_lora(denoiser, victim)
            del self._lru[victim]
            logger.info("unloaded adapter %s from %s (adapter_cache_size=%d)", victim, self.owner, self.capacity)
