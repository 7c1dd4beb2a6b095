"""segquant_core.eval.activation_stats: chunk ranges, negative tails and head ranges on a toy block."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from segquant_core.detect.plan import LayerPlan, Plan, Segments
from segquant_core.eval.activation_stats import collect_activation_stats, format_stats

from .conftest import D, SegToy, seg_calls, seg_plan

# What detection would say about the toy's layers: statistics are classified by these reasons.
REASONS = {
    "ada": ("input from SiLU (aten.silu)",),
    "q": ("input is a per-head reshape 2×16 (aten.flatten)",),
    "proj": ("input is a cat of 2 parts along the last dim",),
    "ff": ("input from GELU (aten.gelu)",),
}


def _toy_plan() -> Plan:
    """The toy's plan with detection's reasons, and ``q`` read as two attention heads of its input."""
    records = []
    for r in seg_plan():
        segments = Segments("in", (D // 2, D // 2)) if r.layer == "q" else r.segments
        records.append(LayerPlan(r.layer, segments, r.dual_scale, REASONS.get(r.layer, ())))
    return Plan(records)


def _inner(model: SegToy, call: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The toy's intermediate tensors, recomputed by hand: what each watched layer sees."""
    modulation = model.ada(F.silu(call["emb"]))
    shift, scale, _ = modulation.unsqueeze(1).chunk(3, dim=-1)
    h = call["x"] * (1 + scale) + shift
    joined = torch.cat([model.q(h), model.k(h)], dim=-1)
    return {"ada_out": modulation, "q_in": h, "proj_in": joined, "ff_in": F.gelu(model.proj(joined))}


def test_the_three_statistics_match_the_toy_block_computed_by_hand():
    model, calls = SegToy().eval(), seg_calls(n=3)
    stats = collect_activation_stats(model, _toy_plan(), calls)
    with torch.no_grad():
        seen = [_inner(model, c) for c in calls]

    def over_calls(key: str) -> torch.Tensor:
        return torch.cat([s[key].reshape(-1, s[key].shape[-1]) for s in seen])

    assert stats.samples == 3
    (ada,) = stats.chunks
    expected = over_calls("ada_out").abs().amax(0).reshape(3, D).amax(1)
    assert ada.layer == "ada" and ada.output_absmax == pytest.approx(expected.tolist(), rel=1e-5)
    assert ada.ratio == pytest.approx(float(expected.max() / expected.min()), rel=1e-5)
    assert ada.weight_ratio > 10  # the toy scales its chunks' weights by 0.1, 1 and 3

    tails = {(t.layer, t.segment): t for t in stats.tails}
    assert set(tails) == {("ada", 0), ("proj", 0), ("proj", 1), ("ff", 0)}
    joined = over_calls("proj_in")
    for index, (a, b) in enumerate(((0, D), (D, D + D // 2))):  # ragged in-segments: one tail each
        part = tails[("proj", index)]
        assert part.neg_min == pytest.approx(float(joined[:, a:b].min()), rel=1e-5)
        assert part.pos_max == pytest.approx(float(joined[:, a:b].max()), rel=1e-5)
    assert [tails[("proj", i)].source for i in (0, 1)] == ["", ""]  # a cat, no activation said
    assert tails[("ada", 0)].source == "SiLU" and -0.2785 < tails[("ada", 0)].neg_min < 0
    gelu = tails[("ff", 0)]
    assert gelu.source == "GELU"
    assert -0.1701 < gelu.neg_min < 0 < gelu.pos_max  # GELU's negative tail is pinned near −0.17
    assert gelu.neg_codes == pytest.approx(127 * -gelu.neg_min / max(gelu.pos_max, -gelu.neg_min))

    (heads,) = stats.heads  # proj's equal-looking cat parts are not heads: only a per-head reshape is
    per_channel = over_calls("q_in").abs().amax(0)
    expected_heads = [float(per_channel[: D // 2].max()), float(per_channel[D // 2 :].max())]
    assert heads.layer == "q" and heads.input_absmax == pytest.approx(expected_heads, rel=1e-5)


def test_summary_json_and_text_name_every_watched_layer():
    model = SegToy().eval()
    stats = collect_activation_stats(model, _toy_plan(), seg_calls(n=2))
    summary = stats.summary()
    assert summary["adaln_layers"] == 0 and summary["other_out_segment_layers"] == 1  # 'ada' is not norm*.linear
    assert summary["gelu_inputs"] == 1 and summary["silu_inputs"] == 1 and summary["head_layers"] == 1
    json.dumps(stats.to_dict())  # plain JSON, no tensors
    text = format_stats(stats)
    for layer in ("ada", "proj", "ff", "q"):
        assert f"\n{layer} " in text
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
