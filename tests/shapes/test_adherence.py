"""The adherence analyser must be exact on rendered ground truth, jittered or not."""

from __future__ import annotations

import numpy as np
import pytest

from segquant_shapes.adherence import aggregate, check_image
from segquant_shapes.attributes import PALETTE, all_single_scenes
from segquant_shapes.captions import caption_for
from segquant_shapes.data import random_scene
from segquant_shapes.render import render_scene


@pytest.mark.parametrize("jitter", [False, True])
def test_perfect_on_rendered_single_shapes(jitter: bool) -> None:
    rng = np.random.default_rng(123)
    scenes = all_single_scenes()
    picks = rng.choice(len(scenes), size=200, replace=False)
    rows = []
    for i in picks:
        scene = scenes[int(i)]
        img = render_scene(scene, rng, jitter=jitter)
        rows.append(check_image(img, caption_for(scene, rng)))
    acc = aggregate(rows)
    assert acc["background"] == acc["color"] == acc["position"] == acc["shape"] == 1.0, acc
    assert acc["size"] >= 0.99, acc


def test_accepts_pil_and_float_arrays() -> None:
    from PIL import Image

    scene = all_single_scenes()[42]
    img = render_scene(scene, jitter=False)
    assert all(check_image(Image.fromarray(img), scene).values())
    assert all(check_image(img.astype(np.float32) / 255.0, scene).values())


def test_detects_wrong_attributes() -> None:
    scene = next(s for s in all_single_scenes() if s.shapes[0].shape == "circle" and s.background == "blue")
    img = render_scene(scene, jitter=False)
    spec = scene.shapes[0]
    other_bg = "white" if spec.color != "white" else "black"
    wrong = f"a {spec.size} {spec.color} triangle in the {spec.position} on a {other_bg} background"
    res = check_image(img, wrong)
    assert not res["shape"] and not res["background"] and res["color"]
    blank = np.zeros((32, 32, 3), np.uint8) + np.array(PALETTE["blue"], np.uint8)
    res = check_image(blank, scene)
    assert res["background"] and not res["color"] and not res["shape"]


def test_multi_shape_scenes_mostly_read_correctly() -> None:
    rng = np.random.default_rng(7)
    rows = [check_image(render_scene(s, rng), s) for s in (random_scene(rng, 2) for _ in range(60))]
    acc = aggregate(rows)
    assert acc["background"] == 1.0 and acc["color"] >= 0.9, acc


def test_aggregate() -> None:
    rows = [
        {"background": True, "color": True, "position": True, "shape": False},
        {"background": True, "color": False, "position": True, "shape": True},
    ]
    acc = aggregate(rows)
    assert acc == {"background": 1.0, "color": 0.5, "position": 1.0, "shape": 0.5, "all": 0.0, "n": 2.0}
