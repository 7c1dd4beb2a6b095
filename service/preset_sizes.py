"""The numbers that decide image sizes for the ``segquant_shapes`` presets, readable without torch.

``tiny:KIND`` sources (and ``shipped:NAME`` on a host without the weights) are built by the worker from
``segquant_shapes.models.PRESETS``, which imports torch and diffusers. The API-side registry only needs the
size-relevant keys of those configs to validate requests, so they are listed here;
``tests/service/test_registry_torch_free.py`` checks that they match the presets.
"""

from __future__ import annotations

from typing import Any

_MMDIT = {"sample_size": 32, "patch_size": 2, "pos_embed_max_size": 16}  # pixel space, 16x16 position table
_UNET = {"sample_size": 32}  # pixel-space UNet: no patch, multiples of 8
# pixel-space Flux: 2x2 packing, RoPE (no position table, no sample_size: the Shapes default of 32 applies)
_FLUX = {"patch_size": 1, "guidance_embeds": False}

PRESET_SIZE_CONFIGS: dict[str, dict[str, Any]] = {
    "mmdit": _MMDIT,
    "mmdit-tiny": _MMDIT,
    "unet": _UNET,
    "unet-tiny": _UNET,
    "flux": {**_FLUX, "axes_dims_rope": (8, 16, 16)},
    "flux-tiny": {**_FLUX, "axes_dims_rope": (4, 6, 6)},
}


def preset_size_config(name: str) -> dict[str, Any] | None:
    """Size-relevant denoiser config of a preset (``mmdit``, ``unet-tiny``…), or None if there is none."""
    found = PRESET_SIZE_CONFIGS.get(name)
    return dict(found) if found is not None else None
