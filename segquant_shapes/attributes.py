"""The closed vocabulary of the procedural shapes world (colours, shapes, positions, sizes).

Everything else (rendering, captions, the adherence analyser) is defined in terms of these tables so
that a caption, its image and the analyser can never disagree about what a word means.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

IMAGE_SIZE: int = 32

# Well separated RGB values (min pairwise L2 distance ~97) so a pixel snaps to its colour unambiguously.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (40, 175, 60),
    "blue": (35, 75, 225),
    "yellow": (240, 225, 35),
    "purple": (145, 50, 195),
    "orange": (250, 135, 0),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
COLORS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
POSITIONS: tuple[str, ...] = ("top left", "top right", "bottom left", "bottom right", "center")
SIZES: tuple[str, ...] = ("small", "large")

# Pixel-space anchors (x, y) of each coarse position and radius of each size on a 32x32 canvas.
POSITION_ANCHORS: dict[str, tuple[float, float]] = {
    "top left": (9.0, 9.0),
    "top right": (23.0, 9.0),
    "bottom left": (9.0, 23.0),
    "bottom right": (23.0, 23.0),
    "center": (16.0, 16.0),
}
SIZE_RADII: dict[str, float] = {"small": 5.0, "large": 7.0}
# Drawing styles. "filled" is the base world; "outlined" (a band OUTLINE_WIDTH px wide, the inside left as
# background) is only ever rendered for LoRA training, so the shipped models have never seen it. Triangles
# get a 1 px band: their inside is too narrow for 2 px to leave a hole at the small size.
STYLES: tuple[str, ...] = ("filled", "outlined")
OUTLINE_WIDTH: dict[str, int] = {"circle": 2, "square": 2, "triangle": 1}


@dataclass(frozen=True)
class ShapeSpec:
    """One drawn object: what, which colour, how big, where (coarse) and how it is drawn."""

    shape: str
    color: str
    size: str
    position: str
    style: str = "filled"


@dataclass(frozen=True)
class Scene:
    """A full image description: a background colour and one to three shapes."""

    background: str
    shapes: tuple[ShapeSpec, ...]

    @property
    def is_single(self) -> bool:
        return len(self.shapes) == 1

    def key(self) -> tuple[str, str, str, str, str]:
        """Attribute combination of a single-shape scene (the unit of the train/eval split; style-blind)."""
        if not self.is_single:
            raise ValueError("only single-shape scenes have a combination key")
        s = self.shapes[0]
        return (self.background, s.color, s.shape, s.position, s.size)


def restyle(scene: Scene, style: str) -> Scene:
    """The same scene with every shape drawn in ``style`` (the split key ignores style)."""
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; known: {', '.join(STYLES)}")
    return Scene(scene.background, tuple(replace(s, style=style) for s in scene.shapes))


def all_single_scenes() -> list[Scene]:
    """Every valid single-shape combination (foreground colour never equals background): 1,680."""
    out: list[Scene] = []
    for bg in COLORS:
        for color in COLORS:
            if color == bg:
                continue
            for shape in SHAPES:
                for pos in POSITIONS:
                    for size in SIZES:
                        out.append(Scene(bg, (ShapeSpec(shape, color, size, pos),)))
    return out
