"""One copy of a model's non-denoiser components, shared by every loaded variant of that model.

A diffusers pipeline is a bag of components (text encoders, tokenizers, VAE, scheduler, denoiser). Only the
denoiser differs between ``fp`` and its quantized variants, so a worker loads the rest once per model and
wraps each variant's denoiser in a *light* pipeline around the same component objects. T5-XXL alone is
≈9.5 GB in bf16: three copies of it (``fp`` + two quantized variants of SD3.5 or Flux) would not fit.

The scheduler is the one stateful component (step index, sigmas), so every call gets a fresh instance made
from the model's scheduler config: concurrent calls never share scheduler state.
"""

from __future__ import annotations

import importlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

import segquant_core as sq
from service.worker.sources import load_source

logger = logging.getLogger(__name__)

DENOISER_NAMES = ("transformer", "unet")


def denoiser_name(pipe: Any) -> str:
    """The component name of ``pipe``'s denoiser (``transformer`` or ``unet``)."""
    components = getattr(pipe, "components", {})
    for name in DENOISER_NAMES:
        if components.get(name) is not None:
            return name
    raise ValueError(f"{type(pipe).__name__} has no transformer or unet component")


def tensor_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers (what it holds resident, kernels' own packs excepted)."""
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


class SharedParts:
    """A model's components minus its denoiser; :meth:`pipeline` puts a denoiser back in for one use."""

    def __init__(
        self, source: str, base: Any, dtype: torch.dtype, device: str, drop_components: Sequence[str] = ()
    ) -> None:
        self.source, self.dtype, self.device = source, dtype, device
        self.drop_components = tuple(drop_components)
        self.pipeline_class = type(base)
        self.denoiser_name = denoiser_name(base)
        self.components: dict[str, Any] = {k: v for k, v in base.components.items() if k != self.denoiser_name}
        self._scheduler_config = base.scheduler.config
        self.shared_bytes = sum(tensor_bytes(c) for c in self.components.values() if isinstance(c, torch.nn.Module))

    @classmethod
    def load(
        cls, source: str, dtype: torch.dtype, device: str, drop_components: Sequence[str] = ()
    ) -> tuple[SharedParts, torch.nn.Module]:
        """Load ``source`` once: its shared parts, and its float denoiser for the first variant to use."""
        base = _load(source, dtype, device, tuple(drop_components))
        return cls(source, base, dtype, device, drop_components), sq.denoiser_of(base)

    def fresh_scheduler(self) -> Any:
        return type(self.components["scheduler"]).from_config(self._scheduler_config)

    def pipeline(self, denoiser: torch.nn.Module) -> Any:
        """A light pipeline: ``denoiser`` + the shared components + a scheduler of its own."""
        parts = {**self.components, self.denoiser_name: denoiser, "scheduler": self.fresh_scheduler()}
        pipe = self.pipeline_class(**parts)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def float_denoiser(self) -> torch.nn.Module:
        """A fresh float denoiser from the source (for another variant, a build, or an evaluation).

        A local diffusers folder loads only its denoiser subfolder; other sources load the whole pipeline
        and keep its denoiser (the rest is freed on return).
        """
        folder = Path(self.source).expanduser()
        index = folder / "model_index.json"
        if index.is_file():
            entries = json.loads(index.read_text())
            entry = entries.get(self.denoiser_name)
            if (
                isinstance(entry, list)
                and len(entry) == 2
                and entry[0]
                and entry[1]
                and not str(entries.get("_class_name", "")).startswith("Shapes")
            ):
                model_class = getattr(importlib.import_module(entry[0]), entry[1])
                model = model_class.from_pretrained(
                    str(folder), subfolder=self.denoiser_name, dtype=self.dtype, use_safetensors=True
                )
                return model.to(self.device).eval()
        return sq.denoiser_of(_load(self.source, self.dtype, self.device, self.drop_components))


def _load(source: str, dtype: torch.dtype, device: str, drop: tuple[str, ...]) -> Any:
    """The source pipeline, without the components the registry drops (passed only when there are some)."""
    return load_source(source, dtype, device, drop) if drop else load_source(source, dtype, device)
