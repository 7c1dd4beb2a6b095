"""Dummy forward arguments for the diffusers denoisers detection knows how to drive.

Detection only needs *one* forward whose shapes follow the model's config; values are random. The default
spatial size is small (4 patches per side) so that capture stays fast even on a full-size model. ``height`` and
``width`` are in latent pixels (the denoiser's own input resolution); for Flux they are the unpacked latent size,
packed 2×2 into ``(height/2)·(width/2)`` tokens.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

_TEXT_TOKENS = 8
_SUPPORTED = ("SD3Transformer2DModel", "FluxTransformer2DModel", "PixArtTransformer2DModel", "UNet2DConditionModel")


def _family(model: nn.Module) -> str | None:
    for cls in type(model).__mro__:
        if cls.__name__ in _SUPPORTED:
            return cls.__name__
    return None


def _dtype_device(model: nn.Module) -> tuple[torch.dtype, torch.device]:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype, p.device
    return torch.float32, torch.device("cpu")


def _size(value: int | None, default: int, multiple: int, what: str, cls: str) -> int:
    size = default if value is None else int(value)
    if size <= 0 or size % multiple:
        raise ValueError(f"{cls}: {what}={size} must be a positive multiple of {multiple}")
    return size


def example_inputs_for(
    model: nn.Module, batch: int = 2, height: int | None = None, width: int | None = None
) -> dict[str, Any]:
    """Valid dummy keyword arguments for one forward of ``model``, read from ``model.config``.

    Supports ``SD3Transformer2DModel`` (SD3 / SD3.5), ``FluxTransformer2DModel``, ``PixArtTransformer2DModel`` and
    ``UNet2DConditionModel`` (including SDXL's ``addition_embed_type="text_time"``, for which ``time_ids`` has the
    6 entries of SDXL base; pass your own ``example_kwargs`` for the 5-entry refiner). Anything else raises
    ``ValueError``: build the kwargs of one real denoiser call and pass them to ``detect`` yourself.
    """
    cls = type(model).__name__
    family = _family(model)
    cfg = getattr(model, "config", None)
    if family is None or cfg is None:
        raise ValueError(
            f"example_inputs_for does not know how to call {cls} (supported: {', '.join(_SUPPORTED)}); "
            "pass example_kwargs (the keyword arguments of one real forward) to detect() instead"
        )
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    dtype, device = _dtype_device(model)
    gen = torch.Generator().manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    def full(value: float) -> torch.Tensor:
        return torch.full((batch,), value, device=device, dtype=dtype)

    if family == "SD3Transformer2DModel":
        p = int(cfg.patch_size)
        side = 4
        if cfg.pos_embed_max_size:
            side = min(side, int(cfg.pos_embed_max_size))
        h = _size(height, side * p, p, "height", cls)
        w = _size(width, side * p, p, "width", cls)
        return {
            "hidden_states": randn(batch, int(cfg.in_channels), h, w),
            "encoder_hidden_states": randn(batch, _TEXT_TOKENS, int(cfg.joint_attention_dim)),
            "pooled_projections": randn(batch, int(cfg.pooled_projection_dim)),
            "timestep": full(500.0),
            "return_dict": False,
        }

    if family == "FluxTransformer2DModel":
        h = _size(height, 8, 2, "height", cls)
        w = _size(width, 8, 2, "width", cls)
        rows, cols = h // 2, w // 2
        n_axes = len(cfg.axes_dims_rope)
        img_ids = torch.zeros(rows * cols, n_axes, device=device, dtype=dtype)
        if n_axes >= 3:
            img_ids[:, 1] = torch.arange(rows, device=device).repeat_interleave(cols).to(dtype)
            img_ids[:, 2] = torch.arange(cols, device=device).repeat(rows).to(dtype)
        kwargs: dict[str, Any] = {
            "hidden_states": randn(batch, rows * cols, int(cfg.in_channels)),
            "encoder_hidden_states": randn(batch, _TEXT_TOKENS, int(cfg.joint_attention_dim)),
            "pooled_projections": randn(batch, int(cfg.pooled_projection_dim)),
            "timestep": full(0.5),
            "img_ids": img_ids,
            "txt_ids": torch.zeros(_TEXT_TOKENS, n_axes, device=device, dtype=dtype),
            "return_dict": False,
        }
        if cfg.guidance_embeds:
            kwargs["guidance"] = full(3.5)
        return kwargs

    if family == "PixArtTransformer2DModel":
        p = int(cfg.patch_size)
        h = _size(height, 4 * p, p, "height", cls)
        w = _size(width, 4 * p, p, "width", cls)
        text_dim = cfg.caption_channels or cfg.cross_attention_dim
        if getattr(model, "use_additional_conditions", False):
            added = {
                "resolution": torch.tensor([[h * 8.0, w * 8.0]] * batch, device=device, dtype=dtype),
                "aspect_ratio": torch.tensor([[h / w]] * batch, device=device, dtype=dtype),
            }
        else:
            added = {"resolution": None, "aspect_ratio": None}
        return {
            "hidden_states": randn(batch, int(cfg.in_channels), h, w),
            "encoder_hidden_states": randn(batch, _TEXT_TOKENS, int(text_dim)),
            "timestep": full(500.0),
            "added_cond_kwargs": added,
            "return_dict": False,
        }

    # UNet2DConditionModel
    factor = 2 ** max(len(cfg.down_block_types) - 1, 0)
    h = _size(height, 2 * factor, factor, "height", cls)
    w = _size(width, 2 * factor, factor, "width", cls)
    if cfg.class_embed_type is not None or cfg.num_class_embeds is not None:
        raise ValueError(
            f"{cls} with class embeddings (class_embed_type={cfg.class_embed_type!r}) needs "
            "class_labels; pass example_kwargs to detect() instead"
        )
    if cfg.encoder_hid_dim_type not in (None, "text_proj"):
        raise ValueError(
            f"{cls} with encoder_hid_dim_type={cfg.encoder_hid_dim_type!r} is not supported by "
            "example_inputs_for; pass example_kwargs to detect() instead"
        )
    cross = cfg.encoder_hid_dim if cfg.encoder_hid_dim_type == "text_proj" else cfg.cross_attention_dim
    if isinstance(cross, (list, tuple)):
        if len(set(cross)) != 1:
            raise ValueError(
                f"{cls} with per-block cross_attention_dim={tuple(cross)} is not supported by "
                "example_inputs_for; pass example_kwargs to detect() instead"
            )
        cross = cross[0]
    kwargs = {
        "sample": randn(batch, int(cfg.in_channels), h, w),
        "timestep": full(500.0),
        "encoder_hidden_states": randn(batch, _TEXT_TOKENS, int(cross)),
        "return_dict": False,
    }
    if cfg.addition_embed_type == "text_time":
        n_time = 6
        text_dim = int(cfg.projection_class_embeddings_input_dim) - n_time * int(cfg.addition_time_embed_dim)
        if text_dim <= 0:
            raise ValueError(
                f"{cls}: projection_class_embeddings_input_dim is too small for 6 time ids; "
                "pass example_kwargs to detect() instead"
            )
        kwargs["added_cond_kwargs"] = {
            "text_embeds": randn(batch, text_dim),
            "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * batch, device=device, dtype=dtype),
        }
    elif cfg.addition_embed_type not in (None, "text"):
        raise ValueError(
            f"{cls} with addition_embed_type={cfg.addition_embed_type!r} is not supported by "
            "example_inputs_for; pass example_kwargs to detect() instead"
        )
    return kwargs
