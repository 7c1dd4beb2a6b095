"""Denoiser configurations (stock diffusers classes) and the one forward signature they share.

All denoisers predict the rectified-flow velocity ``noise - x0`` for ``x_t = (1 - t) x0 + t noise``
and receive ``t * 1000``, the timestep scaling FlowMatchEulerDiscreteScheduler uses.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel

from .flux import flux_config, flux_velocity
from .text_encoder import TEXT_DIM

Denoiser = SD3Transformer2DModel | UNet2DConditionModel | FluxTransformer2DModel


def mmdit_config(layers: int = 4, heads: int = 4, head_dim: int = 32) -> dict[str, Any]:
    """Pixel-space SD3 transformer: patch 2 on 32x32 RGB -> 256 image tokens."""
    return dict(
        sample_size=32,
        patch_size=2,
        in_channels=3,
        out_channels=3,
        num_layers=layers,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=TEXT_DIM,
        caption_projection_dim=heads * head_dim,
        pooled_projection_dim=TEXT_DIM,
        pos_embed_max_size=16,
    )


# Input channels a UNet takes beyond the RGB pixels: the pixel's x and y in [-1, 1] (see ``with_coordinates``).
COORDINATE_CHANNELS = 2


def unet_config(
    channels: tuple[int, ...] = (64, 128),
    layers_per_block: int = 1,
    heads: int = 4,
    groups: int = 32,
    coordinates: bool = False,
) -> dict[str, Any]:
    """Small cross-attention UNet (GEGLU feed-forward is the diffusers default for its transformer blocks).

    ``coordinates``: two more input channels carry each pixel's position. Convolutions and attention without
    positional embeddings cannot tell the top left from the bottom right (the shipped 2-level UNet placed
    shapes at chance; docs/results/unet/position_probe.py). Extra input channels are how stock inpainting
    UNets take their conditioning too, so the class and every layer SegQuant quantizes stay as they were."""
    return dict(
        sample_size=32,
        in_channels=3 + (COORDINATE_CHANNELS if coordinates else 0),
        out_channels=3,
        block_out_channels=channels,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        layers_per_block=layers_per_block,
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=heads,
        norm_num_groups=groups,
    )


PRESETS: dict[str, dict[str, Any]] = {
    "mmdit": mmdit_config(4, 4, 40),
    "unet": unet_config(),
    "unet-coords": unet_config(coordinates=True),
    "flux": flux_config(2, 2, 4, 40),
    "mmdit-tiny": mmdit_config(2, 2, 32),
    "unet-tiny": unet_config(channels=(16, 32), layers_per_block=1, heads=2, groups=8),
    "flux-tiny": flux_config(1, 1, 2, 16),
}


def build_denoiser(kind: str, config: dict[str, Any]) -> Denoiser:
    """Instantiate the stock diffusers class for ``kind`` ('mmdit', 'unet' or 'flux') from a config dict."""
    if kind == "mmdit":
        return SD3Transformer2DModel(**config)
    if kind == "unet":
        return UNet2DConditionModel(**config)
    if kind == "flux":
        return FluxTransformer2DModel(**config)
    raise ValueError(f"unknown model kind {kind!r}")


def denoiser_kind(model: torch.nn.Module) -> str:
    if isinstance(model, SD3Transformer2DModel):
        return "mmdit"
    if isinstance(model, UNet2DConditionModel):
        return "unet"
    if isinstance(model, FluxTransformer2DModel):
        return "flux"
    raise TypeError(f"unsupported denoiser {type(model).__name__}")


def predict_velocity(
    model: Denoiser, x: torch.Tensor, t: torch.Tensor, states: torch.Tensor, pooled: torch.Tensor
) -> torch.Tensor:
    """Velocity prediction for noisy pixels ``x`` at flow time ``t`` in [0, 1] (shape [B])."""
    if isinstance(model, FluxTransformer2DModel):
        return flux_velocity(model, x, t, states, pooled)  # Flux multiplies t by 1000 itself
    timestep = t * 1000.0
    if isinstance(model, SD3Transformer2DModel):
        return model(hidden_states=x, encoder_hidden_states=states, pooled_projections=pooled, timestep=timestep).sample
    extra = int(model.config.in_channels) - x.shape[1]
    if extra == COORDINATE_CHANNELS:
        x = with_coordinates(x)
    elif extra:
        raise ValueError(f"the UNet takes {model.config.in_channels} input channels; got {x.shape[1]} pixel channels")
    return model(x, timestep, encoder_hidden_states=states).sample


def with_coordinates(x: torch.Tensor) -> torch.Tensor:
    """``x`` [B, C, H, W] with two channels appended: each pixel's column and row, from -1 to 1."""
    b, _, h, w = x.shape
    rows = torch.linspace(-1.0, 1.0, h, device=x.device, dtype=x.dtype).view(1, 1, h, 1).expand(b, 1, h, w)
    cols = torch.linspace(-1.0, 1.0, w, device=x.device, dtype=x.dtype).view(1, 1, 1, w).expand(b, 1, h, w)
    return torch.cat([x, cols, rows], dim=1)
