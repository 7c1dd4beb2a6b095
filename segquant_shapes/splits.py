"""Train / held-out split of single-shape attribute combinations, and the prompt lists built from it.

The held-out combinations are never rendered for training (not even inside multi-shape scenes), so
eval prompts measure compositional generalisation rather than memorisation.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from .attributes import COLORS, POSITIONS, SHAPES, SIZES, Scene, ShapeSpec, all_single_scenes
from .captions import canonical_caption

N_HELD_OUT: int = 32
_SPLIT_SEED: int = 20261125


@lru_cache(maxsize=1)
def held_out_scenes() -> tuple[Scene, ...]:
    """32 held-out combinations; any prefix is balanced over shape (i % 3), position (i % 5), size (i % 2)."""
    rng = np.random.default_rng(_SPLIT_SEED)
    bgs = list(np.repeat(np.arange(len(COLORS)), N_HELD_OUT // len(COLORS)))
    rng.shuffle(bgs)
    seen: set[tuple[str, ...]] = set()
    out: list[Scene] = []
    for i in range(N_HELD_OUT):
        bg = COLORS[int(bgs[i])]
        while True:
            color = COLORS[int(rng.integers(len(COLORS)))]
            spec = ShapeSpec(SHAPES[i % 3], color, SIZES[i % 2], POSITIONS[i % 5])
            scene = Scene(bg, (spec,))
            if color != bg and scene.key() not in seen:
                break
        seen.add(scene.key())
        out.append(scene)
    return tuple(out)


@lru_cache(maxsize=1)
def held_out_keys() -> frozenset[tuple[str, str, str, str, str]]:
    return frozenset(s.key() for s in held_out_scenes())


@lru_cache(maxsize=1)
def train_scenes() -> tuple[Scene, ...]:
    """All single-shape combinations that are not held out (1,648)."""
    held = held_out_keys()
    return tuple(s for s in all_single_scenes() if s.key() not in held)


def is_held_out(scene: Scene) -> bool:
    """True if any shape of the scene, with the scene's background, is a held-out combination."""
    held = held_out_keys()
    return any(Scene(scene.background, (s,)).key() in held for s in scene.shapes)


def eval_prompts(n: int = 16) -> list[str]:
    """The first ``n`` held-out prompts (canonical wording), for adherence evaluation."""
    if not 0 < n <= N_HELD_OUT:
        raise ValueError(f"n must be in 1..{N_HELD_OUT}")
    return [canonical_caption(s) for s in held_out_scenes()[:n]]


def calibration_prompts(n: int = 32, seed: int = 0) -> list[str]:
    """``n`` training-side prompts (disjoint from :func:`eval_prompts`), for quantization calibration."""
    scenes = train_scenes()
    if not 0 < n <= len(scenes):
        raise ValueError(f"n must be in 1..{len(scenes)}")
    order = np.random.default_rng(seed).permutation(len(scenes))[:n]
    return [canonical_caption(scenes[int(i)]) for i in order]
