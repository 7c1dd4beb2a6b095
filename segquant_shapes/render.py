"""Deterministic numpy rasteriser for scenes (hard-edged, exact palette colours)."""

from __future__ import annotations

import numpy as np

from .attributes import IMAGE_SIZE, OUTLINE_WIDTH, PALETTE, POSITION_ANCHORS, SIZE_RADII, Scene

_YY, _XX = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32) + 0.5


def shape_mask(shape: str, cx: float, cy: float, r: float, size: int = IMAGE_SIZE) -> np.ndarray:
    """Boolean mask of one shape centred at (cx, cy) with nominal radius r.

    The square's half side is 0.88 r and the triangle (apex up) spans [cy - r, cy + 0.8 r] so the three
    shapes look about equally big; the analyser uses the same geometry for template matching.
    """
    if size == IMAGE_SIZE:
        yy, xx = _YY, _XX
    else:
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    dx, dy = xx - cx, yy - cy
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        h = 0.88 * r
        return (np.abs(dx) <= h) & (np.abs(dy) <= h)
    if shape == "triangle":
        top, bottom = -r, 0.8 * r
        frac = (dy - top) / (bottom - top)  # 0 at apex, 1 at base
        return (frac >= 0) & (frac <= 1) & (np.abs(dx) <= frac * r)
    raise ValueError(f"unknown shape {shape!r}")


def outline(mask: np.ndarray, width: int) -> np.ndarray:
    """Pixels of ``mask`` within ``width`` 8-neighbour steps of its outside (a band of even width)."""
    inner = mask.copy()
    for _ in range(width):
        padded = np.pad(inner, 1, constant_values=False)
        h, w = inner.shape
        for dy in (0, 1, 2):
            for dx in (0, 1, 2):
                inner &= padded[dy : dy + h, dx : dx + w]
    return mask & ~inner


def render_scene(scene: Scene, rng: np.random.Generator | None = None, jitter: bool = True) -> np.ndarray:
    """Render a scene to an HxWx3 uint8 array; with ``jitter`` the centre moves ±1.5 px, size ±10%.

    An outlined shape keeps only the pixels of its filled mask within ``OUTLINE_WIDTH[shape]`` px of the outside;
    style draws no random numbers, so filled scenes render exactly as before styles existed.
    """
    img = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    img[:] = PALETTE[scene.background]
    for spec in scene.shapes:
        cx, cy = POSITION_ANCHORS[spec.position]
        r = SIZE_RADII[spec.size]
        if jitter:
            if rng is None:
                raise ValueError("jitter needs an rng")
            cx += float(rng.uniform(-1.5, 1.5))
            cy += float(rng.uniform(-1.5, 1.5))
            r *= float(rng.uniform(0.9, 1.1))
        mask = shape_mask(spec.shape, cx, cy, r)
        if spec.style == "outlined":
            mask = outline(mask, OUTLINE_WIDTH[spec.shape])
        img[mask] = PALETTE[spec.color]
    return img
