"""segquant_core.calibrate.capture: recording denoiser calls from a pipeline's own loop (§11.2 item 39)."""

from __future__ import annotations

import pytest
import torch

from segquant_core import CalibrationSet, SegLinear, capture_calibration, denoiser_of, quantize, quantize_pipeline

from .conftest import SEG_LAYERS, TinyPipeline, seg_plan

PROMPTS = ["a red circle", "two blue squares on grey", "a triangle"]


def _capture(pipe: TinyPipeline, seed: int, steps: int = 8, per_prompt: int = 3) -> CalibrationSet:
    return capture_calibration(
        pipe, PROMPTS, num_inference_steps=steps, steps_per_prompt=per_prompt, seed=seed, progress=False
    )


# §11.2 item 39: deterministic calibration subset ---------------------------------------------------------------
def test_item39_same_seed_records_the_same_steps_and_inputs():
    a = _capture(TinyPipeline(), seed=3)
    b = _capture(TinyPipeline(), seed=3)
    assert a.steps == b.steps
    assert len(a.calls) == len(b.calls) == len(PROMPTS) * 3
    for ca, cb in zip(a.calls, b.calls):
        assert ca.keys() == cb.keys() == {"x", "emb"}
        assert all(torch.equal(ca[k], cb[k]) for k in ca)
    assert a.describe() == b.describe()


def test_item39_steps_are_a_seeded_subset():
    sets = {seed: _capture(TinyPipeline(), seed=seed).steps for seed in range(4)}
    for steps in sets.values():
        assert len(steps) == len(PROMPTS)
        for per_prompt in steps:
            assert len(per_prompt) == 3 and per_prompt == sorted(per_prompt)
            assert len(set(per_prompt)) == 3 and all(0 <= s < 8 for s in per_prompt)
    assert len({str(s) for s in sets.values()}) > 1  # different seeds pick different subsets


def test_item39_recorded_calls_are_the_recorded_steps():
    pipe = TinyPipeline()
    calib = _capture(pipe, seed=5, steps=6, per_prompt=2)
    assert pipe.calls == len(PROMPTS)  # one pipeline run per prompt
    i = 0
    for prompt, steps in zip(PROMPTS, calib.steps):
        base = float(len(prompt) % 7) / 7.0
        for step in steps:
            t = (6 - step) / 6
            emb = calib.calls[i]["emb"]
            assert torch.allclose(emb, torch.full_like(emb, base + t)), (prompt, step)
            i += 1
    assert i == len(calib.calls)
    # stored on CPU, detached copies
    assert all(not c["x"].requires_grad and c["x"].device.type == "cpu" for c in calib.calls)


def test_describe_and_hook_removal():
    pipe = TinyPipeline()
    calib = _capture(pipe, seed=1)
    d = calib.describe()
    assert d["samples"] == 9 and d["prompts"] == 3 and d["num_inference_steps"] == 8 and d["seed"] == 1
    assert d["recorded_steps"] == calib.steps and d["steps_per_prompt"] == [3]
    assert len(d["prompts_sha256"]) == 64
    assert not pipe.transformer._forward_pre_hooks


def test_capture_argument_errors():
    pipe = TinyPipeline()
    with pytest.raises(ValueError, match="at least one prompt"):
        capture_calibration(pipe, [], progress=False)
    with pytest.raises(ValueError, match=r"steps_per_prompt must be in \[1, 4\]"):
        capture_calibration(pipe, PROMPTS, num_inference_steps=4, steps_per_prompt=5, progress=False)
    with pytest.raises(ValueError, match="no 'transformer' or 'unet'"):
        denoiser_of(object())
    assert denoiser_of(pipe) is pipe.transformer


def test_capture_removes_its_hook_when_the_pipeline_fails():
    class FailingPipe(TinyPipeline):
        def __call__(self, prompt, num_inference_steps=4, generator=None, output_type="latent", **_):
            x = torch.randn(1, 4, self.d)
            self.transformer(x, torch.zeros(1, self.d))  # positional calls are recorded by parameter name
            raise RuntimeError("pipeline broke")

    pipe = FailingPipe()
    with pytest.raises(RuntimeError, match="pipeline broke"):
        capture_calibration(pipe, ["a"], num_inference_steps=1, steps_per_prompt=1, progress=False)
    assert not pipe.transformer._forward_pre_hooks


def test_quantize_from_a_calibration_set_and_quantize_pipeline():
    pipe = TinyPipeline()
    calib = _capture(pipe, seed=2, steps=4, per_prompt=2)
    res = quantize(pipe.transformer, "w8a8-segquant", calib, seg_plan(), progress=False)
    assert res.calibration["recorded_steps"] == calib.steps and res.calibration["samples"] == 6
    assert all(isinstance(getattr(pipe.transformer, n), SegLinear) for n in SEG_LAYERS)
    # the pipeline helper captures and quantizes in one go (same seed → same calibration record)
    pipe2 = TinyPipeline()
    res2 = quantize_pipeline(
        pipe2,
        "w8a8-segquant",
        PROMPTS,
        num_inference_steps=4,
        steps_per_prompt=2,
        seed=2,
        plan=seg_plan(),
        progress=False,
    )
    assert res2.calibration["recorded_steps"] == calib.steps
    out = pipe2("a red circle", num_inference_steps=4, generator=torch.Generator().manual_seed(0))
    ref = TinyPipeline()("a red circle", num_inference_steps=4, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out).all()
    assert float((out - ref).norm() / ref.norm()) < 0.06  # a sanity bound for int8 on this toy (measured 0.05)
