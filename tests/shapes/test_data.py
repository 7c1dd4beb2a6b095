"""Procedural data: determinism, caption/image agreement and caption parsing across templates."""

from __future__ import annotations

import numpy as np

from segquant_shapes.adherence import check_image
from segquant_shapes.attributes import PALETTE, all_single_scenes
from segquant_shapes.captions import TEMPLATES, canonical_caption, caption_for, parse_caption
from segquant_shapes.data import CaptionBank, generate_examples, random_scene
from segquant_shapes.render import render_scene


def test_generator_is_deterministic() -> None:
    a = generate_examples(20, seed=3, multi_share=0.3)
    b = generate_examples(20, seed=3, multi_share=0.3)
    c = generate_examples(20, seed=4, multi_share=0.3)
    assert [e.caption for e in a] == [e.caption for e in b]
    assert all(np.array_equal(x.image, y.image) for x, y in zip(a, b))
    assert [e.caption for e in a] != [e.caption for e in c]


def test_images_are_32px_rgb_with_palette_colours() -> None:
    for ex in generate_examples(10, seed=0, multi_share=0.5):
        assert ex.image.shape == (32, 32, 3) and ex.image.dtype == np.uint8
        colours = {tuple(int(v) for v in px) for px in ex.image.reshape(-1, 3)}
        assert colours <= set(PALETTE.values())
        assert tuple(int(v) for v in ex.image[0, 0]) in {PALETTE[ex.scene.background]} | {
            PALETTE[s.color] for s in ex.scene.shapes
        }


def test_captions_parse_back_to_their_scene() -> None:
    rng = np.random.default_rng(0)
    for n in (1, 1, 1, 2, 3):
        for _ in range(60):
            scene = random_scene(rng, n)
            assert parse_caption(caption_for(scene, rng)) == scene
    assert parse_caption(canonical_caption(all_single_scenes()[0])) == all_single_scenes()[0]


def test_captions_vary_in_wording() -> None:
    scene = all_single_scenes()[100]
    rng = np.random.default_rng(1)
    captions = {caption_for(scene, rng) for _ in range(50)}
    assert len(captions) >= 10
    assert len(TEMPLATES) >= 5
    assert "an orange" in canonical_caption(next(s for s in all_single_scenes() if s.background == "orange"))


def test_caption_and_image_agree() -> None:
    for ex in generate_examples(120, seed=11):
        res = check_image(ex.image, ex.caption)
        assert all(res.values()), (ex.caption, res)


def test_unjittered_render_is_reproducible() -> None:
    scene = all_single_scenes()[5]
    assert np.array_equal(render_scene(scene, jitter=False), render_scene(scene, jitter=False))


def test_caption_bank_has_multi_shape_share() -> None:
    bank = CaptionBank(variants=1, n_multi=50)
    assert len(bank) == bank.n_single + 50
    images, idx = bank.sample(np.random.default_rng(0), 64, multi_share=0.5)
    assert images.shape == (64, 32, 32, 3)
    assert (idx >= bank.n_single).any() and (idx < bank.n_single).any()
