"""The Flux-style shapes denoiser: stock diffusers ``FluxTransformer2DModel`` in pixel space.

Flux has no patch embedding of its own (its pipeline packs 2x2 latent patches into tokens before a plain
linear ``x_embedder``), so the same packing is done here on RGB pixels: 32x32x3 -> 256 tokens of 12
channels. Positions reach the model only through 3-axis RoPE ids (text tokens all zero, image tokens
``(0, row, col)``), exactly as in Flux.1. The MiniLM token states take the T5 role and its pooled vector
the CLIP role. Flux scales ``timestep`` by 1000 internally, so it receives the flow time ``t`` itself.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import FluxTransformer2DModel

from .text_encoder import TEXT_DIM

PACK: int = 2  # pixels per token side (Flux packs 2x2 latent patches the same way)


def flux_config(
    double_layers: int = 2,
    single_layers: int = 4,
    heads: int = 4,
    head_dim: int = 40,
    rope_axes: tuple[int, int, int] | None = None,
    guidance_embeds: bool = False,
) -> dict[str, Any]:
    """Pixel-space Flux: 12 packed channels in/out; RoPE axes sum to ``head_dim`` (text axis smallest)."""
    if rope_axes is None:
        text_axis = (head_dim // 5) // 2 * 2
        side = (head_dim - text_axis) // 2 // 2 * 2
        rope_axes = (head_dim - 2 * side, side, side)
    if sum(rope_axes) != head_dim or any(a % 2 for a in rope_axes):
        raise ValueError(f"rope axes {rope_axes} must be even and sum to head_dim {head_dim}")
    return dict(
        patch_size=1,
        in_channels=3 * PACK * PACK,
        out_channels=3 * PACK * PACK,
        num_layers=double_layers,
        num_single_layers=single_layers,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=TEXT_DIM,
        pooled_projection_dim=TEXT_DIM,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=tuple(rope_axes),
    )


def pack_pixels(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/2)(W/2), 4C] tokens in row-major order (FluxPipeline's latent packing)."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // PACK, PACK, w // PACK, PACK).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // PACK) * (w // PACK), c * PACK * PACK)


def unpack_pixels(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`pack_pixels`."""
    b, _, d = tokens.shape
    c = d // (PACK * PACK)
    x = tokens.view(b, height // PACK, width // PACK, c, PACK, PACK).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, height, width)


def image_ids(height: int, width: int, device: torch.device | None = None) -> torch.Tensor:
    """RoPE ids [(H/2)(W/2), 3] = (0, row, col) per packed token."""
    rows = torch.arange(height // PACK, device=device).repeat_interleave(width // PACK)
    cols = torch.arange(width // PACK, device=device).repeat(height // PACK)
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=1).float()


def flux_velocity(
    model: FluxTransformer2DModel,
    x: torch.Tensor,
    t: torch.Tensor,
    states: torch.Tensor,
    pooled: torch.Tensor,
    guidance: torch.Tensor | None = None,
) -> torch.Tensor:
    """Velocity in pixel layout for noisy pixels ``x`` [B, 3, H, W] at flow time ``t`` [B] in [0, 1]."""
    _, _, h, w = x.shape
    txt_ids = torch.zeros(states.shape[1], 3, device=x.device)
    if model.config.guidance_embeds and guidance is None:
        guidance = torch.ones_like(t)
    out = model(
        hidden_states=pack_pixels(x),
        encoder_hidden_states=states,
        pooled_projections=pooled,
        timestep=t,
        img_ids=image_ids(h, w, x.device),
        txt_ids=txt_ids,
        guidance=guidance,
    ).sample
    return unpack_pixels(out, h, w)
