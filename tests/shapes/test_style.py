"""The "outlined" drawing style (the LoRA concept): rendered, captioned, parsed and read back."""

from __future__ import annotations

import numpy as np
import pytest

from segquant_shapes.adherence import aggregate, check_image, read_image
from segquant_shapes.attributes import Scene, ShapeSpec, restyle
from segquant_shapes.captions import canonical_caption, caption_for, parse_caption
from segquant_shapes.data import CaptionBank, random_scene
from segquant_shapes.render import render_scene


def test_outlined_caption_round_trip_and_filled_captions_unchanged() -> None:
    filled = Scene("blue", (ShapeSpec("circle", "red", "small", "top left"),))
    assert canonical_caption(filled) == "a small red circle in the top left on a blue background"
    outlined = restyle(filled, "outlined")
    assert canonical_caption(outlined) == "a small red outlined circle in the top left on a blue background"
    rng = np.random.default_rng(0)
    for _ in range(50):
        scene = restyle(random_scene(rng, int(rng.integers(1, 3))), "outlined")
        assert parse_caption(caption_for(scene, rng)) == scene
    with pytest.raises(ValueError, match="unknown style"):
        restyle(filled, "dotted")


def test_style_draws_no_random_numbers_and_leaves_a_hole() -> None:
    scene = Scene("white", (ShapeSpec("triangle", "black", "small", "center"),))
    a = render_scene(scene, np.random.default_rng(3))
    b = render_scene(restyle(scene, "outlined"), np.random.default_rng(3))
    drawn_a, drawn_b = (a != a[0, 0]).any(-1), (b != b[0, 0]).any(-1)
    assert (drawn_b & ~drawn_a).sum() == 0 and 0 < drawn_b.sum() < drawn_a.sum()  # same place, fewer pixels
    _, blob, _, _ = read_image(b)
    assert blob is not None and blob.style == "outlined" and blob.shape == "triangle" and blob.size == "small"


@pytest.mark.parametrize("style", ["filled", "outlined"])
def test_analyser_reads_style_on_rendered_truth(style: str) -> None:
    rng = np.random.default_rng(11)
    rows = []
    for _ in range(120):
        scene = restyle(random_scene(rng, 1, allow_held_out=True), style)
        rows.append(check_image(render_scene(scene, rng), caption_for(scene, rng)))
    acc = aggregate(rows)
    assert acc["style"] == 1.0 and acc["all"] == 1.0 and acc["size"] == 1.0, acc
    wrong = "filled" if style == "outlined" else "outlined"
    scene = restyle(random_scene(rng, 1), style)
    assert not check_image(render_scene(scene, rng), restyle(scene, wrong))["style"]


def test_caption_bank_style() -> None:
    bank = CaptionBank(variants=1, n_multi=5, style="outlined")
    assert all(s.style == "outlined" for sc in bank.scenes for s in sc.shapes)
    assert all("outlined" in c for c in bank.captions)
