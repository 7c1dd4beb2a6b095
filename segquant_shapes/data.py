"""Seeded procedural (image, caption) generator and the caption-bank sampler used by training."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .attributes import COLORS, POSITIONS, SHAPES, SIZES, Scene, ShapeSpec, restyle
from .captions import caption_for
from .render import render_scene
from .splits import is_held_out, train_scenes


@dataclass(frozen=True)
class Example:
    """One training example: HxWx3 uint8 image, its caption and the scene it came from."""

    image: np.ndarray
    caption: str
    scene: Scene


def random_scene(rng: np.random.Generator, n_shapes: int, allow_held_out: bool = False) -> Scene:
    """A random scene with ``n_shapes`` shapes at distinct positions, none coloured like the background."""
    while True:
        bg = COLORS[int(rng.integers(len(COLORS)))]
        positions = rng.choice(len(POSITIONS), size=n_shapes, replace=False)
        specs = []
        for p in positions:
            fg = [c for c in COLORS if c != bg]
            specs.append(
                ShapeSpec(
                    SHAPES[int(rng.integers(len(SHAPES)))],
                    fg[int(rng.integers(len(fg)))],
                    SIZES[int(rng.integers(len(SIZES)))],
                    POSITIONS[int(p)],
                )
            )
        scene = Scene(bg, tuple(specs))
        if allow_held_out or not is_held_out(scene):
            return scene


def generate_examples(n: int, seed: int = 0, multi_share: float = 0.0, max_shapes: int = 3) -> list[Example]:
    """``n`` seeded examples; a ``multi_share`` fraction has 2..max_shapes shapes. Train-side only."""
    rng = np.random.default_rng(seed)
    out: list[Example] = []
    for _ in range(n):
        k = int(rng.integers(2, max_shapes + 1)) if rng.random() < multi_share else 1
        scene = random_scene(rng, k)
        out.append(Example(render_scene(scene, rng), caption_for(scene, rng), scene))
    return out


class CaptionBank:
    """Fixed set of (scene, caption) pairs whose text embeddings are computed once and reused.

    Single-shape train scenes get ``variants`` captions each (random template/synonyms); a pool of
    multi-shape scenes adds ``n_multi`` more. Images are rendered on the fly with fresh jitter.
    ``style`` draws every scene of the bank in that style (the base models train on "filled" only).
    """

    def __init__(
        self, variants: int = 6, n_multi: int = 1500, max_shapes: int = 2, seed: int = 0, style: str = "filled"
    ) -> None:
        rng = np.random.default_rng(seed)
        self.scenes: list[Scene] = []
        self.captions: list[str] = []
        for base in train_scenes():
            scene = restyle(base, style)
            for _ in range(variants):
                self.scenes.append(scene)
                self.captions.append(caption_for(scene, rng))
        self.n_single = len(self.scenes)
        for _ in range(n_multi):
            scene = restyle(random_scene(rng, int(rng.integers(2, max_shapes + 1))), style)
            self.scenes.append(scene)
            self.captions.append(caption_for(scene, rng))

    def __len__(self) -> int:
        return len(self.captions)

    def sample(self, rng: np.random.Generator, batch: int, multi_share: float) -> tuple[np.ndarray, np.ndarray]:
        """Return (uint8 images [B,H,W,3], caption indices [B])."""
        n_multi = len(self) - self.n_single
        idx = np.empty(batch, dtype=np.int64)
        for i in range(batch):
            if n_multi and rng.random() < multi_share:
                idx[i] = self.n_single + int(rng.integers(n_multi))
            else:
                idx[i] = int(rng.integers(self.n_single))
        images = np.stack([render_scene(self.scenes[int(i)], rng) for i in idx])
        return images, idx
