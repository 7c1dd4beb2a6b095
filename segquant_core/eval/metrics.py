"""Fidelity metrics of a quantized variant against the float model's images (same prompts, same noise).

PSNR and SSIM are computed on 8-bit RGB images, per image, then averaged; identical images give an
infinite PSNR. Learned metrics (LPIPS, FID) need network weights that cannot be downloaded on our machines;
they are not computed here.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image


def as_uint8(image: Image.Image | np.ndarray) -> np.ndarray:
    arr = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    if arr.dtype != np.uint8:
        arr = np.clip(np.round(arr * 255.0 if arr.max() <= 1.0 else arr), 0, 255).astype(np.uint8)
    return arr


def psnr(reference: Image.Image | np.ndarray, image: Image.Image | np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB on 8-bit RGB (``inf`` for identical images)."""
    a = as_uint8(reference).astype(np.float64)
    b = as_uint8(image).astype(np.float64)
    mse = float(np.mean((a - b) ** 2))
    return math.inf if mse == 0.0 else 10.0 * math.log10(255.0**2 / mse)


def ssim(reference: Image.Image | np.ndarray, image: Image.Image | np.ndarray) -> float:
    """Structural similarity on 8-bit RGB (scikit-image; window shrinks for tiny images)."""
    try:
        from skimage.metrics import structural_similarity
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError("SSIM needs scikit-image: pip install 'segquant-serve[eval]'") from e
    a, b = as_uint8(reference), as_uint8(image)
    win = min(7, a.shape[0], a.shape[1])
    win -= (win + 1) % 2  # odd
    return float(structural_similarity(a, b, channel_axis=-1, data_range=255, win_size=win))


def latent_mse(reference: torch.Tensor, latents: torch.Tensor) -> float:
    return float(torch.mean((reference.float() - latents.float()) ** 2))


def mean_finite(values: list[float]) -> float:
    """Mean that stays ``inf`` when every value is infinite (FP vs FP)."""
    if not values:
        return math.nan
    if all(math.isinf(v) for v in values):
        return math.inf
    return float(np.mean([v for v in values if not math.isinf(v)]))
