"""Tiny random-weight *stock* diffusers pipelines, built from config offline and saved with ``save_pretrained``.

Tokenizers get synthetic vocabularies (letters and a few words; transformers 5.x needs ``vocab=`` /
``merges=``, it ignores ``vocab_file=``), text encoders and denoisers are a few hundred kilobytes, so every
pipeline builds in about a second and generates a 32×32 or 64×64 image in well under a second.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

_WORDS = (
    "a",
    "an",
    "the",
    "of",
    "on",
    "in",
    "with",
    "photo",
    "cat",
    "dog",
    "red",
    "blue",
    "green",
    "circle",
    "square",
    "city",
    "street",
    "portrait",
    "painting",
    "mountain",
    "lake",
    "sign",
    "night",
    "text",
)


def clip_tokenizer(max_length: int = 77) -> Any:
    """A CLIP BPE tokenizer over letters plus a few whole words (no merges needed)."""
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {}
    for piece in [*"abcdefghijklmnopqrstuvwxyz0123456789.,'!?-"]:
        vocab[piece] = len(vocab)
        vocab[piece + "</w>"] = len(vocab)
    for word in _WORDS:
        vocab.setdefault(word + "</w>", len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def t5_tokenizer(max_length: int = 32) -> Any:
    """A T5 (Unigram) tokenizer over letters plus a few whole words."""
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(ch, -3.0) for ch in "abcdefghijklmnopqrstuvwxyz0123456789.,'!?-"]
    pieces += [("▁" + w, -1.0) for w in _WORDS]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=max_length)


def _clip_config(vocab_size: int, projection: int = 32) -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        projection_dim=projection,
        max_position_embeddings=77,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )


def _clip_encoder(tokenizer: Any, *, projection: bool) -> Any:
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return cls(_clip_config(len(tokenizer))).eval()


def _t5_encoder(tokenizer: Any, d_model: int = 32) -> Any:
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    return T5EncoderModel(cfg).eval()


def _vae(latent_channels: int, *, shifted: bool = False, blocks: int = 2) -> Any:
    """A ``2 ** (blocks - 1)``× VAE (2× by default: the size rules must read it, not assume 8×)."""
    from diffusers import AutoencoderKL

    kwargs: dict[str, Any] = {}
    if shifted:  # SD3 and Flux VAEs carry a shift factor their pipelines use
        kwargs = {
            "shift_factor": 0.0609,
            "scaling_factor": 1.5035,
            "use_quant_conv": False,
            "use_post_quant_conv": False,
        }
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8,) * blocks,
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=32,
        **kwargs,
    ).eval()


def sd3(with_t5: bool = True) -> Any:
    """``StableDiffusion3Pipeline``: two CLIP encoders with projection, optionally T5, an SD3 transformer."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    tok, tok2 = clip_tokenizer(), clip_tokenizer()
    tok3 = t5_tokenizer() if with_t5 else None
    transformer = SD3Transformer2DModel(
        sample_size=32,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=32,
        pooled_projection_dim=64,
        out_channels=4,
        pos_embed_max_size=32,
    )
    return StableDiffusion3Pipeline(
        transformer=transformer.eval(),
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_vae(4, shifted=True),
        text_encoder=_clip_encoder(tok, projection=True),
        tokenizer=tok,
        text_encoder_2=_clip_encoder(tok2, projection=True),
        tokenizer_2=tok2,
        text_encoder_3=_t5_encoder(tok3) if tok3 is not None else None,
        tokenizer_3=tok3,
    )


def flux() -> Any:
    """``FluxPipeline``: CLIP (pooled) + T5, a Flux transformer over 2×2-packed latents, an 8× VAE (as real Flux:
    sizes are multiples of 16, the default is 1024)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    tok, tok2 = clip_tokenizer(), t5_tokenizer()
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=(4, 6, 6),
    )
    return FluxPipeline(
        transformer=transformer.eval(),
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_vae(4, shifted=True, blocks=4),
        text_encoder=_clip_encoder(tok, projection=False),
        tokenizer=tok,
        text_encoder_2=_t5_encoder(tok2),
        tokenizer_2=tok2,
    )


def sdxl() -> Any:
    """``StableDiffusionXLPipeline``: two CLIP encoders, a cross-attention UNet with added time embeddings."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    tok, tok2 = clip_tokenizer(), clip_tokenizer()
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=80,
        cross_attention_dim=64,
        norm_num_groups=8,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="leading", steps_offset=1
    )
    return StableDiffusionXLPipeline(
        unet=unet.eval(),
        scheduler=scheduler,
        vae=_vae(4),
        text_encoder=_clip_encoder(tok, projection=False),
        tokenizer=tok,
        text_encoder_2=_clip_encoder(tok2, projection=True),
        tokenizer_2=tok2,
    )


def pixart_sigma() -> Any:
    """``PixArtSigmaPipeline``: T5 + a PixArt transformer with AdaLN-single."""
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    tok = t5_tokenizer()
    transformer = PixArtTransformer2DModel(
        sample_size=16,
        num_layers=2,
        patch_size=2,
        attention_head_dim=8,
        num_attention_heads=3,
        caption_channels=32,
        in_channels=4,
        cross_attention_dim=24,
        out_channels=8,
        attention_bias=True,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
    )
    return PixArtSigmaPipeline(
        transformer=transformer.eval(),
        scheduler=DPMSolverMultistepScheduler(),
        vae=_vae(4),
        text_encoder=_t5_encoder(tok),
        tokenizer=tok,
    )


BUILDERS: dict[str, Callable[[], Any]] = {
    "sd3": sd3,
    "sd3-no-t5": lambda: sd3(with_t5=False),
    "flux": flux,
    "sdxl": sdxl,
    "pixart-sigma": pixart_sigma,
}


def save_stock_pipeline(kind: str, folder: Path, seed: int = 0) -> Path:
    """Build ``kind`` with seeded random weights and ``save_pretrained`` it (safetensors) into ``folder``."""
    torch.manual_seed(seed)
    pipe = BUILDERS[kind]()
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return folder
