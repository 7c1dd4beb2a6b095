"""One training step and a safetensors checkpoint round trip on a tiny model."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from segquant_shapes.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from segquant_shapes.data import generate_examples
from segquant_shapes.models import PRESETS, build_denoiser
from segquant_shapes.text_encoder import encode_prompts
from segquant_shapes.train import TrainConfig, ema_decay, make_optimizer, train_step


def _setup(kind: str):
    torch.manual_seed(0)
    model = build_denoiser(kind, PRESETS[f"{kind}-tiny"]).train()
    ema = copy.deepcopy(model).requires_grad_(False)
    return model, ema, make_optimizer(model, 1e-3)


def test_train_step_updates_weights_and_ema(tmp_path: Path) -> None:
    examples = generate_examples(4, seed=0)
    states, pooled = encode_prompts([e.caption for e in examples])
    images = np.stack([e.image for e in examples])
    cfg = TrainConfig(batch=4)
    for kind in ("mmdit", "unet"):
        model, ema, opt = _setup(kind)
        before = [p.detach().clone() for p in model.parameters()]
        gen = torch.Generator().manual_seed(0)
        losses = [train_step(model, opt, ema, images, states, pooled, s, cfg, gen) for s in range(2)]
        assert all(np.isfinite(losses))
        assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
        assert any(not torch.equal(a, b) for a, b in zip(before, ema.parameters()))


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    examples = generate_examples(2, seed=1)
    states, pooled = encode_prompts([e.caption for e in examples])
    images = np.stack([e.image for e in examples])
    model, ema, opt = _setup("mmdit")
    train_step(model, opt, ema, images, states, pooled, 0, TrainConfig(batch=2), torch.Generator().manual_seed(0))
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, model, ema, opt, {"loss": 0.5, "train_seconds": 1.0}, keep=2)
    ckpt = latest_checkpoint(tmp_path)
    assert ckpt is not None and ckpt.name == "step_000004"
    assert len(list((tmp_path / "checkpoints").glob("step_*"))) == 2
    assert not list(tmp_path.rglob("*.pt")) and not list(tmp_path.rglob("*.bin"))
    model2, ema2, opt2 = _setup("mmdit")
    st = load_checkpoint(ckpt, model2, ema2, opt2)
    assert st["step"] == 4
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(a, b)
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert s1.keys() == s2.keys()
    assert all(torch.equal(s1[k]["exp_avg"], s2[k]["exp_avg"]) for k in s1)


def test_ema_decay_warm_start() -> None:
    assert ema_decay(0, 0.999) == 0.1
    assert ema_decay(10**6, 0.999) == 0.999


def test_init_from_an_exported_pipeline_continues_its_weights_and_step(tmp_path: Path) -> None:
    import json

    from segquant_shapes.pipelines import make_pipeline
    from segquant_shapes.train import init_from_pipeline

    trained, _, _ = _setup("mmdit")
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.01)  # differs from a fresh build
    make_pipeline(trained.eval()).save_pretrained(tmp_path / "pipe", safe_serialization=True)
    (tmp_path / "pipe" / "training.json").write_text(json.dumps({"step": 123, "train_seconds": 45.0}))
    model, ema, _ = _setup("mmdit")
    step, seconds = init_from_pipeline(tmp_path / "pipe", "mmdit", model, ema)
    assert (step, seconds) == (123, 45.0)
    for a, b, c in zip(trained.state_dict().values(), model.state_dict().values(), ema.state_dict().values()):
        assert torch.equal(a, b) and torch.equal(a, c)
    with pytest.raises(FileNotFoundError, match="unet"):
        init_from_pipeline(tmp_path / "pipe", "unet", *_setup("unet")[:2])


def test_a_unet_given_coordinate_channels_starts_from_the_old_weights_computing_the_same(tmp_path: Path) -> None:
    from segquant_shapes.models import predict_velocity, unet_config
    from segquant_shapes.pipelines import make_pipeline
    from segquant_shapes.train import init_from_pipeline

    tiny = {"channels": (16, 32), "layers_per_block": 1, "heads": 2, "groups": 8}
    torch.manual_seed(0)
    old = build_denoiser("unet", unet_config(**tiny)).eval()
    make_pipeline(old).save_pretrained(tmp_path / "pipe", safe_serialization=True)
    wide, wide_ema = (build_denoiser("unet", unet_config(**tiny, coordinates=True)).eval() for _ in range(2))
    init_from_pipeline(tmp_path / "pipe", "unet", wide, wide_ema)
    assert wide.conv_in.weight.shape[1] == 5 and not wide.conv_in.weight[:, 3:].any()  # new filters start at zero
    x, t = torch.randn(2, 3, 32, 32), torch.rand(2)
    states, pooled = encode_prompts(["a red circle in the center on a blue background"] * 2)
    with torch.no_grad():
        assert torch.equal(predict_velocity(old, x, t, states, pooled), predict_velocity(wide, x, t, states, pooled))
        wide.conv_in.weight[:, 3:] = 1.0  # now the coordinates reach the output, and differ between pixels
        moved = predict_velocity(wide, x, t, states, pooled) - predict_velocity(old, x, t, states, pooled)
    assert moved.abs().amax() > 0 and not torch.allclose(moved[..., 0, 0], moved[..., -1, -1])
    pipe = make_pipeline(wide)  # the loop works on RGB; the UNet gets the coordinates on top
    pipe.set_progress_bar_config(disable=True)
    assert pipe("a red circle", num_inference_steps=2, output_type="np").images.shape == (1, 32, 32, 3)
    narrow = {**unet_config(**tiny), "in_channels": 2}
    with pytest.raises(ValueError, match="input channels"):  # a checkpoint wider than the model is refused
        init_from_pipeline(tmp_path / "pipe", "unet", *(build_denoiser("unet", narrow) for _ in range(2)))


def test_cli_rejects_a_missing_init_from_dir_with_one_line(tmp_path: Path, capsys) -> None:
    from segquant_shapes.train import main

    with pytest.raises(SystemExit) as exc:
        main(
            ["--model", "mmdit", "--out", str(tmp_path / "run"), "--init-from", str(tmp_path / "nope"), "--steps", "1"]
        )
    assert "--init-from" in str(exc.value.code) and "\n" not in str(exc.value.code)


def test_signals_ask_for_a_checkpoint_or_a_stop_and_are_restored() -> None:
    import os
    import signal

    from segquant_shapes.train import _Signals

    before = signal.getsignal(signal.SIGTERM)
    s = _Signals()
    s.install()
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert s.save_now and not s.stop
        os.kill(os.getpid(), signal.SIGTERM)
        assert s.stop
    finally:
        s.restore()
    assert signal.getsignal(signal.SIGTERM) is before
