"""A peer's int8 denoiser inside a real pipeline (``bench pipeline --peers``): calls stacked to the timed batch,
non-tensor arguments fixed, the pipeline's own loop unchanged."""

from __future__ import annotations

import gc
import importlib.util
import json
import subprocess
import sys
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch

from segquant_cli.models import load_pipeline
from segquant_core.bench.peers import resolve_peers
from segquant_core.bench.peers.denoiser import (
    build_peer_denoiser,
    install_peer,
    split_call,
    stack_calls,
    uninstall_peer,
)
from segquant_core.calibrate.capture import capture_calibration, denoiser_of
from segquant_core.eval.metrics import psnr

needs_openvino = pytest.mark.skipif(
    any(importlib.util.find_spec(p) is None for p in ("openvino", "nncf")), reason="the 'peers' extra is not installed"
)


def _call(seed: int, rows: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"hidden_states": torch.randn(rows, 4, 8, generator=g), "timestep": torch.rand(rows, generator=g)}


def test_calls_are_stacked_along_the_batch_and_a_short_remainder_dropped():
    calls = [_call(i) | {"img_ids": torch.arange(12.0).reshape(4, 3)} for i in range(5)]
    stacked = stack_calls(calls, 2)
    assert len(stacked) == 2  # the fifth call alone is less than a batch
    assert stacked[0]["hidden_states"].shape == (4, 4, 8)
    assert torch.equal(stacked[1]["timestep"], torch.cat([calls[2]["timestep"], calls[3]["timestep"]]))
    assert torch.equal(stacked[0]["img_ids"], calls[0]["img_ids"])  # no batch dimension: kept once


def test_a_tensor_without_batch_dimension_that_differs_between_calls_is_refused():
    calls = [_call(i) | {"img_ids": torch.full((4, 3), float(i))} for i in range(2)]
    with pytest.raises(ValueError, match="img_ids"):
        stack_calls(calls, 2)
    with pytest.raises(ValueError, match="batch"):
        stack_calls(calls, 0)


def test_a_call_is_split_into_tensors_and_constants_and_nested_tensors_are_refused():
    tensors, constants = split_call(_call(0) | {"joint_attention_kwargs": None, "return_dict": False})
    assert set(tensors) == {"hidden_states", "timestep"} and constants == {"joint_attention_kwargs": None}
    with pytest.raises(ValueError, match="added_cond_kwargs"):
        split_call({"added_cond_kwargs": {"text_embeds": torch.zeros(1)}})


def _images(pipe, prompt: str) -> np.ndarray:
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    return pipe([prompt] * 2, num_inference_steps=3, guidance_scale=3.0, generator=gens, output_type="np").images


@needs_openvino
@pytest.mark.parametrize("model", ["unet", "flux"])  # positional call (UNet); position ids without batch (Flux)
def test_an_openvino_denoiser_serves_the_pipeline_close_to_float(model):
    fp = load_pipeline(f"shipped:{model}")
    fp.set_progress_bar_config(disable=True)
    prompts = fp.default_calibration_prompts(4)
    recorded = capture_calibration(fp, prompts, num_inference_steps=3, steps_per_prompt=2, progress=False)
    built, constants = build_peer_denoiser(resolve_peers(["openvino"])[0], denoiser_of(fp), recorded.calls, 2)
    assert built.int8_linears > 0
    served = load_pipeline(f"shipped:{model}")
    served.set_progress_bar_config(disable=True)
    install_peer(denoiser_of(served), built, constants)
    prompt = fp.default_eval_prompts(1)[0]
    ref, out = _images(fp, prompt), _images(served, prompt)
    assert out.shape == ref.shape
    quality = [psnr(a, b) for a, b in zip(ref, out)]
    assert all(30 < q < float("inf") for q in quality), quality  # int8: close to float, not equal to it
    extra = {"unet": "cross_attention_kwargs", "flux": "joint_attention_kwargs"}[model]
    with pytest.raises(ValueError, match="built for arguments"):  # a call the peer was not built for
        denoiser_of(served)(**recorded.calls[0], **{extra: {"scale": 1.0}})
    # Uninstalling drops the peer's runtime now, on this thread: left to the cyclic collector (pipelines sit in
    # reference cycles), OpenVINO's native objects would be freed at a random later point, on any thread.
    alive = weakref.ref(built)
    gc.disable()
    try:
        uninstall_peer(denoiser_of(served))
        del built
        assert alive() is None
        assert "forward" not in vars(denoiser_of(served))  # the class's own forward again
    finally:
        gc.enable()


@needs_openvino
def test_bench_pipeline_times_a_peer_in_the_same_loop_and_marks_who_is_faster(tmp_path: Path):
    out = tmp_path / "b.json"
    cmd = [sys.executable, "-m", "segquant_cli", "bench", "pipeline", "--model", "shipped:mmdit"]
    cmd += ["--variants", "w8a8-segquant", "--batch", "1", "--steps", "2", "--rounds", "1", "--peers", "openvino"]
    proc = subprocess.run([*cmd, "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {r["variant"]: r for r in json.loads(out.read_text())["rows"]}
    peer = rows[resolve_peers(["openvino"])[0].label]
    assert peer["build_s"] > 0 and peer["checkpoint"] == "peer build"
    assert 15 < peer["psnr_vs_fp_db"] < float("inf")  # two steps from noise: loose (closeness is tested above)
    assert "denoiser_bytes" not in peer  # the float weights stay resident beside it: no memory figure
    for name in ("fp", "w8a8-segquant"):
        row = rows[name]
        assert row["vs_openvino"] == round(peer["s_per_image"] / row["s_per_image"], 3)
        assert row["faster_than_peers"] is (row["vs_openvino"] > 1.0)
    assert rows["fp"]["psnr_vs_fp_db"] == float("inf")


def test_an_unknown_pipeline_peer_is_one_readable_line(tmp_path: Path):
    cmd = [sys.executable, "-m", "segquant_cli", "bench", "pipeline", "--model", "shipped:mmdit", "--peers", "onnx"]
    proc = subprocess.run([*cmd, "--json", str(tmp_path / "b.json")], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "unknown peer 'onnx'" in proc.stderr.strip().splitlines()[-1]
