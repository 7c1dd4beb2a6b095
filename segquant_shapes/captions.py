"""Caption templates (with synonyms) and the inverse parser that reads attributes from any of them.

Multi-shape captions join one clause per shape with " and "; no template uses "and" otherwise, which
is what makes parsing unambiguous.
"""

from __future__ import annotations

import re

import numpy as np

from .attributes import COLORS, POSITIONS, SHAPES, SIZES, Scene, ShapeSpec

SIZE_WORDS: dict[str, tuple[str, ...]] = {"small": ("small", "tiny", "little"), "large": ("large", "big")}
SHAPE_WORDS: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "disc", "dot"),
    "square": ("square", "box"),
    "triangle": ("triangle",),
}
POSITION_WORDS: dict[str, tuple[str, ...]] = {
    "top left": ("top left", "upper left"),
    "top right": ("top right", "upper right"),
    "bottom left": ("bottom left", "lower left"),
    "bottom right": ("bottom right", "lower right"),
    "center": ("center", "middle", "centre"),
}
BACKGROUND_WORDS: tuple[str, ...] = ("background", "backdrop")
# The LoRA trigger: written right before the shape noun ("a small red outlined circle"); filled is unmarked.
STYLE_WORD: str = "outlined"

# {c} colour, {s} size, {n} shape noun, {p} position, {b} background colour, {B} background noun.
# Single-shape templates; index 0 is the canonical form used for eval / calibration prompts.
TEMPLATES: tuple[str, ...] = (
    "a {s} {c} {n} in the {p} on a {b} {B}",
    "a {c} {n}, {s}, at the {p}, {b} {B}",
    "{b} {B} with a {s} {c} {n} in the {p}",
    "a {s} {c} {n} placed at the {p} of a {b} {B}",
    "there is a {s} {c} {n} in the {p} on a {b} {B}",
    "{s} {c} {n}, {p}, {b} {B}",
)
# Clause forms for multi-shape captions.
CLAUSES: tuple[str, ...] = ("a {s} {c} {n} in the {p}", "a {c} {n}, {s}, at the {p}")
MULTI_TEMPLATES: tuple[str, ...] = ("{clauses} on a {b} {B}", "{b} {B} with {clauses}")
_ARTICLE_RE = re.compile(r"(^|\s)a (?=[aeiou])")


def canonical_caption(scene: Scene) -> str:
    """The canonical (template 0, first synonyms) caption of a scene."""
    return caption_for(scene, None)


def caption_for(scene: Scene, rng: np.random.Generator | None) -> str:
    """Caption of a scene; with an rng the template and synonyms are sampled, otherwise canonical."""

    def pick(options: tuple[str, ...]) -> str:
        return options[int(rng.integers(len(options)))] if rng is not None else options[0]

    def fill(t: str, spec: ShapeSpec) -> str:
        return t.format(
            s=pick(SIZE_WORDS[spec.size]),
            c=spec.color,
            n=(f"{STYLE_WORD} " if spec.style == "outlined" else "") + pick(SHAPE_WORDS[spec.shape]),
            p=pick(POSITION_WORDS[spec.position]),
            b=scene.background,
            B=pick(BACKGROUND_WORDS),
        )

    if scene.is_single:
        text = fill(pick(TEMPLATES), scene.shapes[0])
    else:
        clauses = " and ".join(fill(pick(CLAUSES), s) for s in scene.shapes)
        text = pick(MULTI_TEMPLATES).format(clauses=clauses, b=scene.background, B=pick(BACKGROUND_WORDS))
    return _ARTICLE_RE.sub(r"\1an ", text)


_WORD_TO_SIZE = {w: k for k, ws in SIZE_WORDS.items() for w in ws}
_WORD_TO_SHAPE = {w: k for k, ws in SHAPE_WORDS.items() for w in ws}
_POS_RE = [(re.compile(rf"\b{w}\b"), k) for k, ws in POSITION_WORDS.items() for w in ws]
_BG_RE = re.compile(rf"\b({'|'.join(COLORS)})\s+(?:{'|'.join(BACKGROUND_WORDS)})\b")


def parse_caption(caption: str) -> Scene:
    """Recover the scene from a caption of any template; raises ValueError if it cannot."""
    text = caption.lower().strip()
    m = _BG_RE.search(text)
    if m is None:
        raise ValueError(f"no background colour in caption {caption!r}")
    background = m.group(1)
    rest = text[: m.start()] + " " + text[m.end() :]
    specs: list[ShapeSpec] = []
    for chunk in rest.split(" and "):
        words = re.findall(r"[a-z]+", chunk)
        shape = next((_WORD_TO_SHAPE[w] for w in words if w in _WORD_TO_SHAPE), None)
        color = next((w for w in words if w in COLORS), None)
        size = next((_WORD_TO_SIZE[w] for w in words if w in _WORD_TO_SIZE), None)
        pos = next((k for rx, k in _POS_RE if rx.search(chunk)), None)
        if shape is None:
            continue
        if color is None or size is None or pos is None:
            raise ValueError(f"incomplete shape clause {chunk!r} in caption {caption!r}")
        specs.append(ShapeSpec(shape, color, size, pos, "outlined" if STYLE_WORD in words else "filled"))
    if not specs:
        raise ValueError(f"no shape in caption {caption!r}")
    assert all(s.shape in SHAPES and s.size in SIZES and s.position in POSITIONS for s in specs)
    return Scene(background, tuple(specs))
