"""Text-to-image pipelines for the shapes denoisers (MMDiT, UNet, Flux) sharing one sampling loop.

Only the denoiser and the scheduler are registered components, so ``save_pretrained`` writes just
``model_index.json``, the denoiser (safetensors + config) and the scheduler config. The frozen MiniLM
text encoder comes from its installed wheel, loaded lazily and cached per process.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from diffusers import (
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    FluxTransformer2DModel,
    ImagePipelineOutput,
    SD3Transformer2DModel,
    UNet2DConditionModel,
)
from PIL import Image

from .adherence import check_image
from .flux import PACK
from .models import Denoiser, predict_velocity
from .splits import N_HELD_OUT, calibration_prompts, eval_prompts
from .text_encoder import encode_prompts

GeneratorArg = torch.Generator | list[torch.Generator] | None


class ShapesPipelineBase(DiffusionPipeline):
    """Shared prompt encoding, noise preparation, CFG Euler flow-matching loop and output conversion."""

    denoiser_name: str = ""
    _callback_tensor_inputs = ["latents"]  # noqa: RUF012 (diffusers convention)

    @property
    def denoiser(self) -> Denoiser:
        return getattr(self, self.denoiser_name)

    @property
    def _denoiser_dtype(self) -> torch.dtype:
        return next(self.denoiser.parameters()).dtype

    @property
    def _denoiser_device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    @property
    def pixel_channels(self) -> int:
        """Channels of the images (and noise) the loop works on (a UNet may take more: coordinate channels)."""
        return int(self.denoiser.config.out_channels)

    # Defaults the `segquant` CLI and the service look for (quantize / eval / bench on this model).
    def default_eval_prompts(self, n: int = 32) -> list[str]:
        """Held-out prompts (never seen in training nor used for calibration)."""
        return eval_prompts(max(1, min(n, N_HELD_OUT)))

    def default_calibration_prompts(self, n: int = 64) -> list[str]:
        """Training-side prompts, disjoint from :meth:`default_eval_prompts`."""
        return calibration_prompts(n)

    def adherence_scorer(self, image: Image.Image, prompt: str) -> dict[str, bool]:
        """Per-attribute prompt adherence of a generated image (deterministic analyser)."""
        return check_image(image, prompt)

    def encode_prompt(
        self, prompt: str | list[str], num_images_per_prompt: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(token states, pooled) repeated per image; an empty prompt gives the zero 'unconditional' code."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        states, pooled = encode_prompts(prompts)
        return (
            states.repeat_interleave(num_images_per_prompt, 0),
            pooled.repeat_interleave(num_images_per_prompt, 0),
        )

    def prepare_latents(
        self, batch: int, height: int, width: int, generator: GeneratorArg, latents: torch.Tensor | None
    ) -> torch.Tensor:
        """Initial noise in fp32; with a generator list, image i depends only on generator i."""
        shape = (batch, self.pixel_channels, height, width)
        if latents is not None:
            if tuple(latents.shape) != shape:
                raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
            return latents.float().cpu()
        if isinstance(generator, list):
            if len(generator) != batch:
                raise ValueError(f"got {len(generator)} generators for {batch} images")
            return torch.cat([torch.randn((1, *shape[1:]), generator=g) for g in generator])
        return torch.randn(shape, generator=generator)

    def _check_size(self, height: int, width: int) -> None:
        sample = int(self.denoiser.config.sample_size)
        if isinstance(self.denoiser, SD3Transformer2DModel):
            p = int(self.denoiser.config.patch_size)
            limit = p * int(self.denoiser.config.pos_embed_max_size or sample // p)
            if height % p or width % p or max(height, width) > limit:
                raise ValueError(f"height/width must be multiples of {p} and at most {limit}")
        elif height % 8 or width % 8:
            raise ValueError("height/width must be multiples of 8")

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int = 20,
        guidance_scale: float = 3.0,
        generator: GeneratorArg = None,
        height: int = 32,
        width: int = 32,
        num_images_per_prompt: int = 1,
        output_type: str = "pil",
        latents: torch.Tensor | None = None,
        callback_on_step_end: Callable[..., dict[str, Any] | None] | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        return_dict: bool = True,
        prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
    ) -> ImagePipelineOutput | tuple[Any]:
        """Generate images; CFG runs cond and uncond in one batched denoiser call per step.

        ``callback_on_step_end(pipe, step_index, timestep, callback_kwargs)`` runs after every step;
        exceptions it raises propagate (the server uses this for cancellation).
        """
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"unsupported output_type {output_type!r}")
        self._check_size(height, width)
        if prompt_embeds is None:
            if prompt is None:
                raise ValueError("pass prompt or prompt_embeds")
            states, pooled = self.encode_prompt(prompt, num_images_per_prompt)
        else:
            if pooled_prompt_embeds is None:
                raise ValueError("prompt_embeds needs pooled_prompt_embeds")
            states = prompt_embeds.float().cpu().repeat_interleave(num_images_per_prompt, 0)
            pooled = pooled_prompt_embeds.float().cpu().repeat_interleave(num_images_per_prompt, 0)
        batch = states.shape[0]
        do_cfg = guidance_scale > 1.0
        if do_cfg:
            if negative_prompt is None:
                neg_s, neg_p = torch.zeros_like(states), torch.zeros_like(pooled)
            else:
                negs = (
                    [negative_prompt] * (batch // num_images_per_prompt)
                    if isinstance(negative_prompt, str)
                    else list(negative_prompt)
                )
                neg_s, neg_p = self.encode_prompt(negs, num_images_per_prompt)
                if neg_s.shape[0] != batch:
                    raise ValueError("negative_prompt must match the number of prompts")
            states, pooled = torch.cat([neg_s, states]), torch.cat([neg_p, pooled])
        device, dtype = self._denoiser_device, self._denoiser_dtype
        states, pooled = states.to(device, dtype), pooled.to(device, dtype)
        x = self.prepare_latents(batch, height, width, generator, latents).to(device)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        tensor_inputs = callback_on_step_end_tensor_inputs or ["latents"]
        self._num_timesteps = len(timesteps)
        with self.progress_bar(total=len(timesteps)) as bar:
            for i, t in enumerate(timesteps):
                model_in = torch.cat([x, x]) if do_cfg else x
                sigma = (t / self.scheduler.config.num_train_timesteps).expand(model_in.shape[0])
                v = predict_velocity(self.denoiser, model_in.to(dtype), sigma.to(dtype), states, pooled).float()
                if do_cfg:
                    v_uncond, v_cond = v.chunk(2)
                    v = v_uncond + guidance_scale * (v_cond - v_uncond)
                x = self.scheduler.step(v, t, x, return_dict=False)[0]
                if callback_on_step_end is not None:
                    local = {"latents": x}
                    out = callback_on_step_end(self, i, t, {k: local[k] for k in tensor_inputs if k in local})
                    if out:
                        x = out.get("latents", x)
                bar.update()
        self.maybe_free_model_hooks()
        images = _convert(x, output_type)
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)


def _convert(x: torch.Tensor, output_type: str) -> Any:
    """Pixel-space [-1, 1] tensor -> requested output type."""
    if output_type == "latent":
        return x
    img = (x.float() / 2 + 0.5).clamp(0, 1)
    if output_type == "pt":
        return img
    arr = img.permute(0, 2, 3, 1).cpu().numpy()
    if output_type == "np":
        return arr
    return [Image.fromarray(np.round(a * 255).astype(np.uint8)) for a in arr]


class ShapesMMDiTPipeline(ShapesPipelineBase):
    """Pixel-space SD3-style MMDiT (stock ``SD3Transformer2DModel``) with MiniLM conditioning."""

    denoiser_name = "transformer"
    model_cpu_offload_seq = "transformer"

    def __init__(self, transformer: SD3Transformer2DModel, scheduler: FlowMatchEulerDiscreteScheduler) -> None:
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler)


class ShapesUNetPipeline(ShapesPipelineBase):
    """Pixel-space cross-attention UNet (stock ``UNet2DConditionModel``) with MiniLM conditioning."""

    denoiser_name = "unet"
    model_cpu_offload_seq = "unet"

    def __init__(self, unet: UNet2DConditionModel, scheduler: FlowMatchEulerDiscreteScheduler) -> None:
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)


class ShapesFluxPipeline(ShapesPipelineBase):
    """Pixel-space Flux-style transformer (stock ``FluxTransformer2DModel``) with MiniLM conditioning.

    MiniLM token states stand in for T5 and its pooled vector for CLIP; 2x2 pixel patches are packed into
    tokens inside :func:`segquant_shapes.flux.flux_velocity`, so the sampling loop is the shared one.
    """

    denoiser_name = "transformer"
    model_cpu_offload_seq = "transformer"

    def __init__(self, transformer: FluxTransformer2DModel, scheduler: FlowMatchEulerDiscreteScheduler) -> None:
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler)

    @property
    def pixel_channels(self) -> int:
        """The transformer sees packed 2x2 patches; the loop works on the RGB pixels."""
        return int(self.transformer.config.in_channels) // (PACK * PACK)

    def _check_size(self, height: int, width: int) -> None:
        """RoPE ids cover any size; only the 2x2 packing constrains it (trained at 32x32)."""
        if height % PACK or width % PACK or height <= 0 or width <= 0:
            raise ValueError(f"height/width must be positive multiples of {PACK}")


def _register_with_diffusers() -> None:
    """Make ``DiffusionPipeline.from_pretrained(dir)`` resolve our ``_class_name`` (it looks in ``diffusers``)."""
    import diffusers

    for cls in (ShapesMMDiTPipeline, ShapesUNetPipeline, ShapesFluxPipeline):
        setattr(diffusers, cls.__name__, cls)


_register_with_diffusers()


def make_pipeline(denoiser: Denoiser) -> ShapesPipelineBase:
    """Wrap a denoiser with a fresh flow-matching scheduler in the matching pipeline class."""
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    if isinstance(denoiser, SD3Transformer2DModel):
        return ShapesMMDiTPipeline(transformer=denoiser, scheduler=scheduler)
    if isinstance(denoiser, FluxTransformer2DModel):
        return ShapesFluxPipeline(transformer=denoiser, scheduler=scheduler)
    return ShapesUNetPipeline(unet=denoiser, scheduler=scheduler)
