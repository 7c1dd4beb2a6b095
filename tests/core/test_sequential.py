"""Block-sequential calibration: same α and weight codes as the whole-model pass, on every denoiser family.

Tiny diffusers denoisers built from config (random weights). The whole-model pass
(``quantize(..., sequential=False)``) is the reference: block-sequential calibration must choose the same
α for every segment of every layer and give (at least 99.9 %) the same weight codes.
"""

from __future__ import annotations

import copy
import functools
import threading
from typing import Any

import pytest
import torch
from diffusers import FluxTransformer2DModel, PixArtTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel
from torch import nn

from segquant_core import Plan, SegLinear, detect, quantize, quantize_pipeline
from segquant_core.calibrate.blocks import execution_order, find_units
from segquant_core.calibrate.input_store import InputStore
from segquant_core.calibrate.observer import InputObserver
from segquant_core.calibrate.sequential import UnitRunsAgain, run_sequential
from tests.detect.detect_tiny_models import tiny_flux as tiny_flux_model
from tests.detect.detect_tiny_models import tiny_sdxl_unet

from .conftest import SEG_LAYERS, SegToy, TinyPipeline, gen, seg_calls, seg_plan


def tiny_sd3() -> SD3Transformer2DModel:
    """Block 0 dual-attention, block 1 ``context_pre_only``; RMS qk-norm."""
    torch.manual_seed(0)
    return SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,
        caption_projection_dim=16,
        pooled_projection_dim=32,
        pos_embed_max_size=16,
        dual_attention_layers=(0,),
        qk_norm="rms_norm",
    ).eval()


def sd3_calls(n: int = 4) -> list[dict[str, Any]]:
    g = gen(1)
    return [
        {
            "hidden_states": torch.randn(2, 4, 8, 8, generator=g),
            "encoder_hidden_states": torch.randn(2, 5, 32, generator=g),
            "pooled_projections": torch.randn(2, 32, generator=g),
            "timestep": torch.rand(2, generator=g) * 1000,
        }
        for _ in range(n)
    ]


def tiny_unet() -> UNet2DConditionModel:
    """SDXL-like: down/mid/up blocks with skips, GEGLU, text_time added conditions."""
    return tiny_sdxl_unet(sample_size=8, attention_layers=1)


def unet_calls(n: int = 4) -> list[dict[str, Any]]:
    g = gen(2)
    return [
        {
            "sample": torch.randn(2, 4, 8, 8, generator=g),
            "timestep": torch.rand(2, generator=g) * 1000,
            "encoder_hidden_states": torch.randn(2, 5, 32, generator=g),
            "added_cond_kwargs": {
                "text_embeds": torch.randn(2, 32, generator=g),
                "time_ids": torch.rand(2, 6, generator=g) * 64,
            },
        }
        for _ in range(n)
    ]


def tiny_flux() -> FluxTransformer2DModel:
    return tiny_flux_model(num_single_layers=2)


def flux_calls(n: int = 4) -> list[dict[str, Any]]:
    g = gen(3)
    return [
        {
            "hidden_states": torch.randn(1, 16, 16, generator=g),
            "encoder_hidden_states": torch.randn(1, 4, 32, generator=g),
            "pooled_projections": torch.randn(1, 32, generator=g),
            "timestep": torch.rand(1, generator=g),
            "img_ids": torch.zeros(16, 3),
            "txt_ids": torch.zeros(4, 3),
            "guidance": torch.full((1,), 3.5),
        }
        for _ in range(n)
    ]


def tiny_pixart() -> PixArtTransformer2DModel:
    torch.manual_seed(0)
    return PixArtTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        cross_attention_dim=16,
        caption_channels=32,
        sample_size=8,
        patch_size=2,
    ).eval()


def pixart_calls(n: int = 4) -> list[dict[str, Any]]:
    g = gen(4)
    return [
        {
            "hidden_states": torch.randn(2, 4, 8, 8, generator=g),
            "encoder_hidden_states": torch.randn(2, 5, 32, generator=g),
            "timestep": torch.rand(2, generator=g) * 1000,
            "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
        }
        for _ in range(n)
    ]


FAMILIES = {
    "sd3": (tiny_sd3, sd3_calls),
    "unet": (tiny_unet, unet_calls),
    "flux": (tiny_flux, flux_calls),
    "pixart": (tiny_pixart, pixart_calls),
}


def _codes_agreement(a: nn.Module, b: nn.Module, names: list[str]) -> float:
    same = total = 0
    for n in names:
        for sa, sb in zip(a.get_submodule(n).segs, b.get_submodule(n).segs):
            ca, cb = sa.quantized_weight().data, sb.quantized_weight().data  # codes (kernels may hold them)
            assert ca.device.type != "meta" and ca.shape == cb.shape
            same += int((ca == cb).sum())
            total += ca.numel()
    return same / total


@functools.cache
def _plan(family: str) -> Plan:
    build, make_calls = FAMILIES[family]
    return detect(build(), make_calls(1)[0])


@pytest.mark.parametrize(
    ("family", "spec"),
    [(f, "w4a8-segquant") for f in FAMILIES] + [("sd3", "w8a8-segquant"), ("unet", "w8a8-segquant")],
)
def test_sequential_matches_whole_model(family: str, spec: str) -> None:
    build, make_calls = FAMILIES[family]
    model, calls, plan = build(), make_calls(), _plan(family)
    seq, whole = copy.deepcopy(model), copy.deepcopy(model)
    r_seq = quantize(seq, spec, calls, plan, progress=False)
    r_whole = quantize(whole, spec, calls, plan, progress=False, sequential=False)
    assert r_seq.calibration_run["mode"] == "sequential" and r_whole.calibration_run["mode"] == "whole-model"
    assert list(r_seq.layers) == list(r_whole.layers) and len(r_seq.layers) > 10
    assert r_seq.excluded == r_whole.excluded
    for name, rep in r_seq.layers.items():
        assert [s.alpha for s in rep.segments] == [s.alpha for s in r_whole.layers[name].segments], name
    assert _codes_agreement(seq, whole, list(r_seq.layers)) >= 0.999
    assert all(isinstance(seq.get_submodule(n), SegLinear) for n in r_seq.layers)
    x = make_calls(1)[0]
    with torch.no_grad():
        out_seq, out_whole = seq(**x)[0], whole(**x)[0]
    assert torch.allclose(out_seq, out_whole, rtol=1e-4, atol=1e-5)


def test_units_of_each_family() -> None:
    sd3 = find_units(tiny_sd3(), [n for n, m in tiny_sd3().named_modules() if isinstance(m, nn.Linear)])
    blocks = [u.name for u in sd3 if u.name.startswith("transformer_blocks")]
    assert blocks == ["transformer_blocks.0", "transformer_blocks.1"]
    dual = next(u for u in sd3 if u.name == "transformer_blocks.0")
    assert any(".attn2." in n for n in dual.layers)  # the dual-attention block is one unit with its attn2
    assert {"context_embedder", "proj_out", "norm_out.linear"} <= {u.name for u in sd3}

    flux = tiny_flux()
    names = [u.name for u in find_units(flux, [n for n, m in flux.named_modules() if isinstance(m, nn.Linear)])]
    assert {"transformer_blocks.0", "single_transformer_blocks.0", "single_transformer_blocks.1"} <= set(names)

    pixart = tiny_pixart()
    names = [u.name for u in find_units(pixart, [n for n, m in pixart.named_modules() if isinstance(m, nn.Linear)])]
    assert {
        "transformer_blocks.0",
        "transformer_blocks.1",
        "adaln_single.linear",
        "caption_projection.linear_1",
    } <= set(names)


def test_unet_units_in_execution_order() -> None:
    unet = tiny_unet()
    targets = [n for n, m in unet.named_modules() if isinstance(m, nn.Linear)]
    units = find_units(unet, targets)
    # down block 0 has no linear (DownBlock2D's resnets take the time embedding through a Linear, so it has)
    order = execution_order(unet, units, unet_calls(1)[0])
    blocks = [n for n in order if "blocks" in n or n == "mid_block"]
    assert blocks == ["down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.0", "up_blocks.1"]
    assert order.index("time_embedding.linear_1") < order.index("down_blocks.0")
    r = quantize(copy.deepcopy(unet), "w8a8-segquant", unet_calls(2), progress=False)
    assert r.calibration_run["units"] == order  # the runner follows the forward's own order


def test_spilled_inputs_give_the_same_result(tmp_path) -> None:
    model, calls, plan = tiny_sd3(), sd3_calls(), _plan("sd3")
    kept, spilled = copy.deepcopy(model), copy.deepcopy(model)
    r_kept = quantize(kept, "w4a8-segquant", calls, plan, progress=False)
    r_spill = quantize(spilled, "w4a8-segquant", calls, plan, progress=False, input_budget_bytes=0, spill_dir=tmp_path)
    assert r_kept.calibration_run["spilled_bytes"] == 0
    assert r_spill.calibration_run["spilled_bytes"] > 0
    assert list(tmp_path.iterdir()) == []  # the spill folder is removed afterwards
    assert _codes_agreement(kept, spilled, list(r_kept.layers)) == 1.0
    for name, rep in r_kept.layers.items():
        assert [s.alpha for s in rep.segments] == [s.alpha for s in r_spill.layers[name].segments]


def test_progress_callback_counts_units() -> None:
    events: list[tuple[str, int, int]] = []
    r = quantize(
        SegToy(),
        "w8a8-segquant",
        seg_calls(),
        seg_plan(),
        progress=False,
        on_progress=lambda phase, done, total: events.append((phase, done, total)),
    )
    calibrate = [e for e in events if e[0] == "calibrate"]
    assert calibrate == [("calibrate", i, len(SEG_LAYERS)) for i in range(1, len(SEG_LAYERS) + 1)]
    assert events[-2:] == [("backends", 0, 1), ("backends", 1, 1)]
    assert r.calibration_run["units"] == list(SEG_LAYERS)  # top-level linears are units, in forward order


class _Reuses(nn.Module):
    """Calls the same linear twice per forward: it cannot be a unit of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(torch.relu(self.a(x)))


def test_module_run_twice_per_forward_falls_back_to_one_whole_model_pass() -> None:
    calls = [{"x": torch.randn(3, 8, generator=gen(i))} for i in range(2)]
    model = _Reuses()
    with pytest.raises(UnitRunsAgain, match=r"runs again after it was calibrated"):
        run_sequential(
            model,
            calls,
            find_units(model, ["a"]),
            begin=lambda u: None,
            enter=lambda *a: None,
            end=lambda u: None,
            store=InputStore(1 << 30, model),
        )
    a, b = _Reuses(), _Reuses()
    b.load_state_dict(a.state_dict())
    fell_back = quantize(a, "w8a8-smooth", calls, progress=False)
    reference = quantize(b, "w8a8-smooth", calls, progress=False, sequential=False)
    assert fell_back.calibration_run["mode"] == "whole-model"
    assert "runs again" in fell_back.calibration_run["fallback_reason"]
    assert list(fell_back.layers) == list(reference.layers) == ["a"]
    with torch.no_grad():
        assert torch.equal(a(**calls[0]), b(**calls[0]))


def test_forward_error_propagates_and_leaves_nothing_behind() -> None:
    model = SegToy()
    bad = [*seg_calls(), {"x": torch.randn(2, 8, 7), "emb": torch.randn(2, 32)}]  # wrong feature size
    with pytest.raises(RuntimeError, match=r"shapes cannot be multiplied|size mismatch|must match"):
        quantize(model, "w8a8-segquant", bad, seg_plan(), progress=False)
    assert not [t for t in threading.enumerate() if t.name.startswith("segquant-calibration")]
    assert not any(m._forward_pre_hooks for m in model.modules())
    assert not any(isinstance(m, SegLinear) for m in model.modules())


def test_qkv_share_one_hessian() -> None:
    model, calls = tiny_sd3(), sd3_calls(2)
    attn = model.transformer_blocks[0].attn
    layers = {"q": attn.to_q, "k": attn.to_k, "v": attn.to_v, "out": attn.to_out[0]}
    with InputObserver(layers, rows_per_call=4, hessian_for=dict.fromkeys(layers)) as obs, torch.no_grad():
        for i, call in enumerate(calls):
            obs.start_call(i, len(calls))
            model(**call)
    st = obs.stats
    assert st["k"].hessians is st["q"].hessians and st["v"].hessians is st["q"].hessians
    assert st["k"].hessian_source == "q" and st["out"].hessian_source is None
    assert st["out"].hessians is not st["q"].hessians
    assert st["q"].hessians[0].dtype == torch.float32


def test_quantize_pipeline_reports_capture_then_calibration() -> None:
    events: list[tuple[str, int, int]] = []
    quantize_pipeline(
        TinyPipeline(),
        "w8a8-segquant",
        ["a red square", "a blue circle"],
        num_inference_steps=4,
        steps_per_prompt=2,
        plan=seg_plan(),
        progress=False,
        on_progress=lambda *e: events.append(e),
    )
    assert events[:2] == [("capture", 1, 2), ("capture", 2, 2)]
    assert ("calibrate", len(SEG_LAYERS), len(SEG_LAYERS)) in events and events[-1] == ("backends", 1, 1)
