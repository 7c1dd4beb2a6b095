"""The side-by-side sheet of an evaluation: geometry that scales with the image size, and the sheet itself.

Why a geometry of its own: small images (32 px Shapes) are enlarged so a reader can see them, large ones
(1024² Flux) are shrunk into thumbnails so the sheet stays ≤ ``MAX_SIDE`` pixels a side, and the runner
can shrink every image to its cell as soon as it is scored — memory stays bounded at any resolution.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from PIL import Image, ImageDraw

MAX_SIDE = 4096  # pixels, each side of the sheet (well inside Pillow's decompression-bomb limit)
MAX_ROWS = 16  # prompts shown (first seed only)
LABEL_HEIGHT = 14
SMALL = 128  # images with a longer side below this are enlarged by a whole factor, at most 4×


def cell_size(width: int, height: int, columns: int, rows: int, max_side: int = MAX_SIDE) -> tuple[int, int]:
    """The (width, height) of one cell: small images enlarged (≤ 4×), the sheet capped at ``max_side``."""
    longest = max(width, height)
    scale = float(max(1, min(4, SMALL // longest))) if longest < SMALL else 1.0
    scale = min(scale, (max_side / max(columns, 1)) / width, (max_side - LABEL_HEIGHT) / max(rows, 1) / height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def fit(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """``image`` at ``size``: nearest-neighbour when enlarging (crisp pixels), Lanczos when shrinking."""
    if image.size == size:
        return image
    method = Image.NEAREST if size[0] >= image.width else Image.LANCZOS
    return image.convert("RGB").resize(size, method)


def sheet(columns: Sequence[tuple[str, Mapping[int, Image.Image]]], rows: int, max_side: int = MAX_SIDE) -> Image.Image:
    """Columns of (name, {row: image}) under a header row of names; every cell the same size."""
    sample = next(iter(columns[0][1].values()))
    w, h = cell_size(sample.width, sample.height, len(columns), rows, max_side)
    canvas = Image.new("RGB", (w * len(columns), LABEL_HEIGHT + h * rows), "white")
    draw = ImageDraw.Draw(canvas)
    for ci, (name, images) in enumerate(columns):
        draw.text((ci * w + 2, 1), name[: max(4, w // 6)], fill="black")
        for ri in range(rows):
            if ri in images:
                canvas.paste(fit(images[ri], (w, h)), (ci * w, LABEL_HEIGHT + ri * h))
    return canvas
