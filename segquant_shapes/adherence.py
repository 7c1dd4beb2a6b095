"""Deterministic prompt-adherence analyser for shapes images (no learned model involved).

Background = border median snapped to the palette. Shape colour = most common palette colour among
pixels far from the background. Position = nearest anchor to the centroid of the largest blob of that
colour. Shape type = best IoU when matching circle / square / triangle templates (same geometry as the
renderer) around the blob's bounding box. Size = fitted radius against the small/large midpoint.
Style = "outlined" when the blob encloses holes (pixels the outside cannot reach) of at least
``OUTLINED_HOLE_SHARE`` of its filled area; an outlined blob's shape and size are read from the filled area.
A filled blob is read exactly as before styles existed, so the base world's scores do not change.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .attributes import PALETTE, POSITION_ANCHORS, SHAPES, SIZE_RADII, Scene
from .captions import parse_caption
from .render import shape_mask

ATTRIBUTES: tuple[str, ...] = ("background", "color", "position", "shape")
_NAMES = list(PALETTE)
_RGB = np.array([PALETTE[n] for n in _NAMES], dtype=np.float32)
FG_DISTANCE: float = 80.0
# Rendered outlines leave holes of >= 26% of the filled area (1 px triangles, small) up to 70%; filled
# shapes none. The threshold sits well below the rendered minimum so a slightly smeared ring still counts.
OUTLINED_HOLE_SHARE: float = 0.1
_SIZE_SPLIT = 0.5 * (SIZE_RADII["small"] + SIZE_RADII["large"])
# Pixel area per r^2 of each rendered shape (see render.shape_mask), to read the size from the area.
_AREA_PER_R2 = {"circle": np.pi, "square": 1.76**2, "triangle": 1.8}


@dataclass(frozen=True)
class BlobReading:
    """What the analyser sees for one coloured blob."""

    color: str
    position: str | None
    shape: str | None
    size: str | None
    pixels: int
    style: str | None = None


def to_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """HxWx3 float32 in 0..255 from a PIL image, uint8 array or float [0, 1] array."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32)
    arr = np.asarray(image)
    if arr.dtype == np.uint8:
        return arr.astype(np.float32)
    return np.clip(arr.astype(np.float32), 0.0, 1.0) * 255.0


def snap(rgb: np.ndarray) -> np.ndarray:
    """Index of the nearest palette colour for each RGB vector (last axis)."""
    d = ((rgb[..., None, :] - _RGB) ** 2).sum(-1)
    return d.argmin(-1)


def read_background(arr: np.ndarray) -> str:
    border = np.concatenate([arr[0], arr[-1], arr[1:-1, 0], arr[1:-1, -1]])
    return _NAMES[int(snap(np.median(border, axis=0)))]


def largest_component(mask: np.ndarray) -> np.ndarray:
    """Largest 8-connected component of a boolean mask (ties: first found in raster order)."""
    h, w = mask.shape
    labels = np.zeros((h, w), dtype=np.int32)
    best, best_size, cur = 0, 0, 0
    for y0, x0 in zip(*np.nonzero(mask)):
        if labels[y0, x0]:
            continue
        cur += 1
        labels[y0, x0] = cur
        size, queue = 0, deque([(int(y0), int(x0))])
        while queue:
            y, x = queue.popleft()
            size += 1
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    ny, nx = y + dy, x + dx
                    if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not labels[ny, nx]:
                        labels[ny, nx] = cur
                        queue.append((ny, nx))
        if size > best_size:
            best, best_size = cur, size
    return labels == best if best else np.zeros_like(mask)


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """``mask`` plus every pixel the image border cannot reach through 4-connected non-mask pixels."""
    h, w = mask.shape
    outside = np.zeros_like(mask)
    queue = deque((y, x) for y in range(h) for x in (0, w - 1) if not mask[y, x])
    queue.extend((y, x) for x in range(w) for y in (0, h - 1) if not mask[y, x])
    for y, x in queue:
        outside[y, x] = True
    while queue:
        y, x = queue.popleft()
        for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
            if 0 <= ny < h and 0 <= nx < w and not mask[ny, nx] and not outside[ny, nx]:
                outside[ny, nx] = True
                queue.append((ny, nx))
    return ~outside


def nearest_position(cx: float, cy: float) -> str:
    return min(POSITION_ANCHORS, key=lambda k: (POSITION_ANCHORS[k][0] - cx) ** 2 + (POSITION_ANCHORS[k][1] - cy) ** 2)


def _initial_fit(shape: str, x0: int, x1: int, y0: int, y1: int) -> tuple[float, float, float]:
    w, h = x1 - x0 + 1, y1 - y0 + 1
    cx, cy = (x0 + x1 + 1) / 2, (y0 + y1 + 1) / 2
    if shape == "circle":
        return cx, cy, (w + h) / 4
    if shape == "square":
        return cx, cy, (w + h) / 4 / 0.88
    r = 0.5 * (w / 2 + h / 1.8)
    return cx, y0 + r, r


def classify_shape(mask: np.ndarray) -> tuple[str | None, float]:
    """(shape, fitted radius) by best template IoU over small centre / scale perturbations."""
    ys, xs = np.nonzero(mask)
    if len(xs) < 4:
        return None, 0.0
    x0, x1, y0, y1 = int(xs.min()), int(xs.max()), int(ys.min()), int(ys.max())
    best: tuple[float, str | None, float] = (-1.0, None, 0.0)
    offsets = (-1.0, -0.5, 0.0, 0.5, 1.0)
    for shape in SHAPES:
        cx, cy, r = _initial_fit(shape, x0, x1, y0, y1)
        for s in (0.85, 0.925, 1.0, 1.075, 1.15):
            for oy in offsets:
                for ox in offsets:
                    tmpl = shape_mask(shape, cx + ox, cy + oy, r * s, size=mask.shape[0])
                    inter = np.count_nonzero(tmpl & mask)
                    iou = inter / max(1, np.count_nonzero(tmpl | mask))
                    if iou > best[0] + 1e-9:
                        best = (iou, shape, r * s)
    return best[1], best[2]


def read_blob(snapped: np.ndarray, fg: np.ndarray, color: str) -> BlobReading:
    """Analyse the largest blob of ``color`` among foreground pixels."""
    mask = largest_component(fg & (snapped == _NAMES.index(color)))
    n = int(mask.sum())
    if n == 0:
        return BlobReading(color, None, None, None, 0)
    ys, xs = np.nonzero(mask)
    pos = nearest_position(float(xs.mean()) + 0.5, float(ys.mean()) + 0.5)
    filled = fill_holes(mask)
    area = int(filled.sum())
    style = "outlined" if area - n >= OUTLINED_HOLE_SHARE * area else "filled"
    if style == "outlined":
        mask, n = filled, area
    shape, _ = classify_shape(mask)
    size = None if shape is None else ("large" if np.sqrt(n / _AREA_PER_R2[shape]) >= _SIZE_SPLIT else "small")
    return BlobReading(color, pos, shape, size, n, style)


def read_image(image: Image.Image | np.ndarray) -> tuple[str, BlobReading | None, np.ndarray, np.ndarray]:
    """(background, dominant blob or None, snapped palette indices, foreground mask)."""
    arr = to_array(image)
    bg = read_background(arr)
    fg = np.sqrt(((arr - np.array(PALETTE[bg], dtype=np.float32)) ** 2).sum(-1)) > FG_DISTANCE
    snapped = snap(arr)
    fg &= snapped != _NAMES.index(bg)
    if not fg.any():
        return bg, None, snapped, fg
    counts = np.bincount(snapped[fg], minlength=len(_NAMES))
    color = _NAMES[int(counts.argmax())]
    return bg, read_blob(snapped, fg, color), snapped, fg


def check_image(image: Image.Image | np.ndarray, prompt: str | Scene) -> dict[str, bool]:
    """Per-attribute correctness of an image for its prompt (any caption template, 1-3 shapes).

    Keys: background, color, position, shape, size, style. For multi-shape prompts every shape must be
    found (its colour present, and its largest blob at the stated position with the stated type, size and
    style). ``style`` is not part of ``all`` (ATTRIBUTES), so base-world figures read as before.
    """
    scene = parse_caption(prompt) if isinstance(prompt, str) else prompt
    bg, blob, snapped, fg = read_image(image)
    res = {"background": bg == scene.background}
    if scene.is_single:
        spec = scene.shapes[0]
        ok = blob is not None
        res["color"] = ok and blob.color == spec.color
        res["position"] = ok and blob.position == spec.position
        res["shape"] = ok and blob.shape == spec.shape
        res["size"] = ok and blob.size == spec.size
        res["style"] = ok and blob.style == spec.style
        return res
    readings = [read_blob(snapped, fg, s.color) for s in scene.shapes]
    res["color"] = all(r.pixels > 0 for r in readings)
    res["position"] = all(r.position == s.position for r, s in zip(readings, scene.shapes))
    res["shape"] = all(r.shape == s.shape for r, s in zip(readings, scene.shapes))
    res["size"] = all(r.size == s.size for r, s in zip(readings, scene.shapes))
    res["style"] = all(r.style == s.style for r, s in zip(readings, scene.shapes))
    return res


def aggregate(results: Iterable[dict[str, bool]]) -> dict[str, float]:
    """Accuracy per attribute plus ``all`` (every attribute right) and the sample count ``n``."""
    rows = list(results)
    if not rows:
        return {"n": 0.0}
    keys = list(rows[0])
    out = {k: float(np.mean([r[k] for r in rows])) for k in keys}
    out["all"] = float(np.mean([all(r[k] for k in ATTRIBUTES) for r in rows]))
    out["n"] = float(len(rows))
    return out
