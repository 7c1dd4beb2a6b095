"""The denoisers users bring, at full size: their public diffusers ``config.json`` values, built on the meta device.

One source for every place that measures or checks at real shapes: the real-size golden plans
(tests/detect), ``segquant bench quantize|memory`` (reduced depth) and the computed serving figures.

Values follow ``shared/reference/REAL_SIZE.md`` and the public repositories' ``config.json`` (written here from
those files' contents; this machine has no model hub, so they were not re-downloaded). The PixArt-Σ file is a
``Transformer2DModel`` config: ``from_config`` ignores its keys that ``PixArtTransformer2DModel`` does not take
(``double_self_attention``, ``num_vector_embeds``, ...), as diffusers does when it loads the real repository.

Models are built under ``torch.device("meta")``: parameters have shapes but no storage, so even Flux.1-dev
(11.9 B parameters) costs nothing to build, and detection runs its one forward on meta tensors.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import FluxTransformer2DModel, PixArtTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel
from torch import nn

# stabilityai/stable-diffusion-3.5-medium, transformer/config.json
SD35_MEDIUM: dict[str, Any] = {
    "attention_head_dim": 64,
    "caption_projection_dim": 1536,
    "dual_attention_layers": list(range(13)),
    "in_channels": 16,
    "joint_attention_dim": 4096,
    "num_attention_heads": 24,
    "num_layers": 24,
    "out_channels": 16,
    "patch_size": 2,
    "pooled_projection_dim": 2048,
    "pos_embed_max_size": 384,
    "qk_norm": "rms_norm",
    "sample_size": 128,
}

# stabilityai/stable-diffusion-3.5-large, transformer/config.json (no dual-attention blocks)
SD35_LARGE: dict[str, Any] = {
    "attention_head_dim": 64,
    "caption_projection_dim": 2432,
    "in_channels": 16,
    "joint_attention_dim": 4096,
    "num_attention_heads": 38,
    "num_layers": 38,
    "out_channels": 16,
    "patch_size": 2,
    "pooled_projection_dim": 2048,
    "pos_embed_max_size": 192,
    "qk_norm": "rms_norm",
    "sample_size": 128,
}

# black-forest-labs/FLUX.1-dev, transformer/config.json
FLUX1_DEV: dict[str, Any] = {
    "attention_head_dim": 128,
    "axes_dims_rope": [16, 56, 56],
    "guidance_embeds": True,
    "in_channels": 64,
    "joint_attention_dim": 4096,
    "num_attention_heads": 24,
    "num_layers": 19,
    "num_single_layers": 38,
    "patch_size": 1,
    "pooled_projection_dim": 768,
}

# stabilityai/stable-diffusion-xl-base-1.0, unet/config.json ("attention_head_dim" is diffusers' legacy name for
# the number of heads: 5/10/20 heads of 64 channels)
SDXL_UNET: dict[str, Any] = {
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "class_embed_type": None,
    "class_embeddings_concat": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_dim": 2048,
    "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_attention_heads": None,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default",
    "sample_size": 128,
    "time_cond_proj_dim": None,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": None,
    "use_linear_projection": True,
}

# PixArt-alpha/PixArt-Sigma-XL-2-1024-MS, transformer/config.json (no micro-conditions: resolution/aspect unused)
PIXART_SIGMA_1024: dict[str, Any] = {
    "activation_fn": "gelu-approximate",
    "attention_bias": True,
    "attention_head_dim": 72,
    "attention_type": "default",
    "caption_channels": 4096,
    "cross_attention_dim": 1152,
    "double_self_attention": False,
    "dropout": 0.0,
    "in_channels": 4,
    "interpolation_scale": 2,
    "norm_elementwise_affine": False,
    "norm_eps": 1e-06,
    "norm_num_groups": 32,
    "norm_type": "ada_norm_single",
    "num_attention_heads": 16,
    "num_embeds_ada_norm": 1000,
    "num_layers": 28,
    "num_vector_embeds": None,
    "only_cross_attention": False,
    "out_channels": 8,
    "patch_size": 2,
    "sample_size": 128,
    "upcast_attention": False,
    "use_additional_conditions": False,
    "use_linear_projection": False,
}

#: name -> (diffusers class, config.json values)
REAL_SIZE_MODELS: dict[str, tuple[type[nn.Module], dict[str, Any]]] = {
    "sd3.5-medium": (SD3Transformer2DModel, SD35_MEDIUM),
    "sd3.5-large": (SD3Transformer2DModel, SD35_LARGE),
    "flux.1-dev": (FluxTransformer2DModel, FLUX1_DEV),
    "sdxl-unet": (UNet2DConditionModel, SDXL_UNET),
    "pixart-sigma-1024": (PixArtTransformer2DModel, PIXART_SIGMA_1024),
}


def sd35_medium_config(layers: int = 24) -> dict[str, Any]:
    """SD3.5-medium's config with its depth reduced to ``layers`` blocks (dual attention kept where it falls)."""
    if not 1 <= layers <= 24:
        raise ValueError(f"--layers must be between 1 and 24 (SD3.5-medium has 24 blocks), got {layers}")
    cfg = dict(SD35_MEDIUM, num_layers=layers)
    cfg["dual_attention_layers"] = [i for i in SD35_MEDIUM["dual_attention_layers"] if i < layers]
    return cfg


def build_on_meta(name: str) -> nn.Module:
    """The full-size model ``name`` with every parameter and buffer on the meta device (no storage)."""
    cls, config = REAL_SIZE_MODELS[name]
    with torch.device("meta"):
        model = cls.from_config(dict(config))  # type: ignore[attr-defined]
    return model.eval()
