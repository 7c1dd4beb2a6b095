"""detect()'s contract: example inputs, plan JSON round trip, the model left untouched, include, capture fallback."""

from __future__ import annotations

import logging

import pytest
import torch
from detect_tiny_models import tiny_flux, tiny_pixart, tiny_sd3, tiny_sdxl_unet
from diffusers import UNet2DConditionModel
from torch import nn

from segquant_core.detect import CaptureError, LayerPlan, Plan, capture, detect, example_inputs_for


# ------------------------------------------------------------------------------------------------------------
# example_inputs_for
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("build", [tiny_sd3, tiny_flux, tiny_pixart, tiny_sdxl_unet])
def test_example_inputs_drive_a_forward(build) -> None:  # type: ignore[no-untyped-def]
    model = build()
    kwargs = example_inputs_for(model, batch=3)
    with torch.no_grad():
        out = model(**kwargs)[0]
    assert out.shape[0] == 3
    assert torch.isfinite(out).all()


def test_example_inputs_custom_size() -> None:
    model = tiny_sd3()
    kwargs = example_inputs_for(model, batch=1, height=12, width=8)
    assert kwargs["hidden_states"].shape == (1, 4, 12, 8)
    with torch.no_grad():
        assert model(**kwargs)[0].shape == (1, 4, 12, 8)
    flux_kwargs = example_inputs_for(tiny_flux(), height=4, width=6)
    assert flux_kwargs["hidden_states"].shape[1] == flux_kwargs["img_ids"].shape[0] == 2 * 3
    with pytest.raises(ValueError, match="multiple of 2"):
        example_inputs_for(model, height=7)


def test_example_inputs_follow_sdxl_text_time_config() -> None:
    kwargs = example_inputs_for(tiny_sdxl_unet())
    added = kwargs["added_cond_kwargs"]
    assert added["text_embeds"].shape == (2, 32) and added["time_ids"].shape == (2, 6)


def test_example_inputs_unsupported_models() -> None:
    with pytest.raises(ValueError, match=r"Sequential.*example_kwargs"):
        example_inputs_for(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="example_kwargs"):
        detect(nn.Linear(2, 2))  # no example inputs and no way to build them
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        mid_block_type=None,
        class_embed_type="timestep",
    )
    with pytest.raises(ValueError, match=r"UNet2DConditionModel.*class_labels"):
        example_inputs_for(unet)


# ------------------------------------------------------------------------------------------------------------
# plan round trip, model untouched, include
# ------------------------------------------------------------------------------------------------------------
class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.Sequential(nn.SiLU(), nn.Linear(8, 24))
        self.drop = nn.Dropout(0.5)
        self.heads = nn.Linear(8, 8)
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.norm(emb)[:, None].chunk(3, dim=-1)
        h = self.drop(x) * (1 + scale) + shift
        h = self.heads(h.view(*h.shape[:2], 2, 4).flatten(2))
        return gate * self.fc(torch.nn.functional.gelu(h))


@pytest.mark.parametrize("method", ["auto", "dispatch"])
def test_detect_leaves_the_model_unchanged(method: str) -> None:
    torch.manual_seed(0)
    model = Toy()
    model.train()
    model.fc.eval()  # mixed flags must come back exactly
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [m.training for m in model.modules()]
    hooks = [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]
    x, emb = torch.randn(2, 5, 8), torch.randn(2, 8)
    detect(model, example_args=(x, emb), capture_method=method)  # type: ignore[arg-type]
    assert [m.training for m in model.modules()] == flags
    assert [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()] == hooks
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.requires_grad for p in model.parameters())


def test_toy_plan_and_json_round_trip(tmp_path) -> None:  # type: ignore[no-untyped-def]
    plan = detect(Toy(), {"x": torch.randn(2, 5, 8), "emb": torch.randn(2, 8)})
    assert plan.to_list() == [
        {"layer": "norm.1", "segments": {"axis": "out", "sizes": [8, 8, 8]}, "dual_scale": True},
        {"layer": "heads", "segments": {"axis": "in", "sizes": [4, 4]}, "dual_scale": False},
        {"layer": "fc", "segments": None, "dual_scale": True},
    ]
    again = Plan.from_json(plan.to_json(with_reasons=True))
    assert again == plan
    assert [r.reasons for r in again] == [r.reasons for r in plan]
    plan.save(tmp_path / "plan.json")
    assert Plan.load(tmp_path / "plan.json").to_list(True) == plan.to_list(True)


def test_per_segment_dual_scale_in_json() -> None:
    """A mixed list is kept per in-segment; a bool (every plan written before) means every segment; a list of
    equal flags is that bool; a mixed list needs in-segments, one flag each."""
    record = {"layer": "p", "segments": {"axis": "in", "sizes": [16, 64]}, "dual_scale": [False, True]}
    rec = LayerPlan.from_dict(record)
    assert rec.dual_scale == (False, True) and rec.any_dual and rec.to_dict() == record
    assert Plan.from_json(Plan([rec]).to_json()) == Plan([rec])
    old = LayerPlan.from_dict({**record, "dual_scale": True})
    assert old.dual_mask == (True, True)
    assert LayerPlan.from_dict({**record, "dual_scale": [True, True]}).to_dict()["dual_scale"] is True
    assert LayerPlan("fc", None, True).dual_mask == (True,)
    for bad, match in (
        ({**record, "segments": {"axis": "out", "sizes": [16, 64]}}, "needs in-segments"),
        ({**record, "dual_scale": [False, True, True]}, "one flag per"),
        ({**record, "segments": None}, "needs in-segments"),
        ({**record, "dual_scale": ["no", True]}, "true/false or a list"),
        ({**record, "dual_scale": "yes"}, "true/false or a list"),
    ):
        with pytest.raises(ValueError, match=match):
            LayerPlan.from_dict(bad)


def test_export_is_the_default_capture(caplog: pytest.LogCaptureFixture) -> None:
    args = (torch.randn(2, 5, 8), torch.randn(2, 8))
    assert capture(Toy(), args).method == "torch.export"
    with caplog.at_level(logging.INFO, logger="segquant_core.detect"):
        detect(Toy(), example_args=args)
    assert "with torch.export (non-strict)" in caplog.text


def test_include_filters_records() -> None:
    args = (torch.randn(2, 5, 8), torch.randn(2, 8))
    plan = detect(Toy(), example_args=args, include=lambda name: name != "heads")
    assert plan.layers == ["norm.1", "fc"]
    assert plan["norm.1"].segments is not None  # the excluded layer still takes part in the dataflow


# ------------------------------------------------------------------------------------------------------------
# capture fallback
# ------------------------------------------------------------------------------------------------------------
class DataDependent(nn.Module):
    """A value-dependent branch: torch.export cannot trace it, the dispatch recorder follows the taken branch."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 8)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if x.sum() > 0:
            return self.lin(x).chunk(2, dim=-1)
        return self.lin(x).chunk(4, dim=-1)


def test_falls_back_to_dispatch_when_export_fails(caplog: pytest.LogCaptureFixture) -> None:
    x = torch.ones(2, 4)
    with caplog.at_level(logging.INFO, logger="segquant_core.detect"):
        plan = detect(DataDependent(), example_args=(x,))
    assert plan["lin"].segments is not None and plan["lin"].segments.sizes == (4, 4)
    assert "falling back to dispatch" in caplog.text
    assert "with dispatch-level recording" in caplog.text
    with pytest.raises(CaptureError):
        detect(DataDependent(), example_args=(x,), capture_method="export")
