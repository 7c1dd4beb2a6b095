"""The held-out (eval) prompt combinations never appear on the training side."""

from __future__ import annotations

from segquant_shapes import calibration_prompts, eval_prompts
from segquant_shapes.captions import parse_caption
from segquant_shapes.data import CaptionBank, generate_examples
from segquant_shapes.splits import N_HELD_OUT, held_out_keys, held_out_scenes, is_held_out, train_scenes


def test_split_sizes_and_disjointness() -> None:
    held = held_out_keys()
    train = {s.key() for s in train_scenes()}
    assert len(held) == N_HELD_OUT
    assert len(train) + len(held) == 1680
    assert not held & train


def test_eval_and_calibration_prompts_are_disjoint() -> None:
    ev = eval_prompts(N_HELD_OUT)
    cal = calibration_prompts(200)
    assert len(set(ev)) == N_HELD_OUT and len(set(cal)) == 200
    assert not set(ev) & set(cal)
    assert {parse_caption(p).key() for p in ev} == held_out_keys()
    assert not {parse_caption(p).key() for p in cal} & held_out_keys()
    assert eval_prompts(16) == ev[:16]
    assert calibration_prompts(10) == calibration_prompts(10)


def test_eval_prompts_are_balanced_over_shapes() -> None:
    shapes = [s.shapes[0].shape for s in held_out_scenes()[:30]]
    assert shapes.count("circle") == shapes.count("square") == shapes.count("triangle") == 10


def test_training_data_excludes_held_out_combinations() -> None:
    bank = CaptionBank(variants=2, n_multi=300)
    assert not any(is_held_out(s) for s in bank.scenes)
    assert not any(is_held_out(e.scene) for e in generate_examples(300, seed=5, multi_share=0.5))
