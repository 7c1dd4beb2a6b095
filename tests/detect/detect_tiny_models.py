"""Tiny diffusers denoisers built from config (random weights, no downloads) for the detection tests."""

from __future__ import annotations

import torch
from diffusers import FluxTransformer2DModel, PixArtTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel


def tiny_sd3() -> SD3Transformer2DModel:
    """SD3.5-style: block 0 is a dual-attention block (AdaLayerNormZeroX, attn2), block 1 is the last,
    ``context_pre_only`` block; RMS qk-norm. inner dim 16 = 2 heads × 8."""
    torch.manual_seed(0)
    return SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,
        caption_projection_dim=16,
        pooled_projection_dim=32,
        pos_embed_max_size=16,
        dual_attention_layers=(0,),
        qk_norm="rms_norm",
    ).eval()


def tiny_flux(num_single_layers: int = 1) -> FluxTransformer2DModel:
    """One double and ``num_single_layers`` single blocks, guidance embedder; inner dim 32 = 2 heads × 16 (rope
    axes 4+6+6). The one tiny Flux config of the test suite (detection, export, sequential calibration)."""
    torch.manual_seed(0)
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=num_single_layers,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    ).eval()


def tiny_pixart() -> PixArtTransformer2DModel:
    """Two ada_norm_single blocks; inner dim 16 = 2 heads × 8; caption projection 32 → 16."""
    torch.manual_seed(0)
    return PixArtTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        cross_attention_dim=16,
        caption_channels=32,
        sample_size=8,
        patch_size=2,
    ).eval()


def tiny_sdxl_unet(sample_size: int = 16, attention_layers: int = 2) -> UNet2DConditionModel:
    """SDXL-like: GEGLU feed-forwards, linear projections, cross-attention, text_time added conditions
    (text_embeds 32 | 6 time ids × 8) and ``attention_layers`` transformer layers in the attention block. The
    one tiny SDXL-style config of the test suite (detection, sequential calibration, compile)."""
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=(2, 4),
        transformer_layers_per_block=(1, attention_layers),
        norm_num_groups=8,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=32 + 6 * 8,
    ).eval()
