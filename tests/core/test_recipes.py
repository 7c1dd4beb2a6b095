"""segquant_core.recipes: presets, switches, (de)serialisation, per-layer overrides (§11.2 item 36, B8)."""

from __future__ import annotations

import itertools
import json

import pytest

from segquant_core import Recipe, recipe, recipe_names
from segquant_core.detect.plan import LayerPlan, Segments
from segquant_core.formats import QuantFormat
from segquant_core.quantizers import Granularity
from segquant_core.recipes import DEFAULT_ALPHA_GRID, LayerOverride

PRESETS = ["fp", "w8a8", "w8a8-smooth", "w8a8-segquant", "w4a8-segquant", "fp8-segquant"]
SEG_DUAL = LayerPlan("blk.norm1.linear", Segments("out", (8, 8, 8)), dual_scale=True)


def _json_round_trip(r: Recipe) -> Recipe:
    return Recipe.from_dict(json.loads(json.dumps(r.to_dict())))


def test_presets_exist_and_construct():
    assert recipe_names() == PRESETS
    for name in PRESETS:
        r = recipe(name)
        assert r.name == name and isinstance(r, Recipe)
    assert recipe("fp").quantizes is False
    assert recipe("fp").resolve("anything", SEG_DUAL) is None


def test_preset_contents():
    seg = recipe("w8a8-segquant").resolve(SEG_DUAL.layer, SEG_DUAL)
    assert seg.weight.fmt is QuantFormat.INT8 and seg.activation.dual and seg.smooth
    assert seg.segments == Segments("out", (8, 8, 8))
    assert seg.alpha_grid == DEFAULT_ALPHA_GRID
    w4 = recipe("w4a8-segquant").resolve(SEG_DUAL.layer, SEG_DUAL)
    assert w4.weight.fmt is QuantFormat.INT4 and w4.weight.granularity is Granularity.CHANNEL
    assert w4.activation.granularity is Granularity.TOKEN and w4.activation.dynamic and w4.gptq
    fp8 = recipe("fp8-segquant").resolve(SEG_DUAL.layer, SEG_DUAL)
    assert fp8.weight.fmt is QuantFormat.FP8_E4M3 and fp8.activation.fmt is QuantFormat.FP8_E4M3
    assert fp8.smooth is False
    base = recipe("w8a8").resolve(SEG_DUAL.layer, SEG_DUAL)
    assert base.segments is None and base.activation.dual is False  # the plan is ignored when the switches are off


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_round_trips_through_json(name):
    r = recipe(name)
    assert _json_round_trip(r) == r
    d = r.to_dict()
    assert d["_type"] == "segquant.Recipe" and d["_version"] == 1


def test_round_trip_with_overrides_and_excludes():
    r = recipe(
        "w8a8-segquant:lowrank=8",
        excludes=("*.proj_out", "time_*"),
        overrides=(
            LayerOverride.from_dict({"pattern": "*.ff.*", "weight": "int4", "weight_granularity": "channel"}),
            LayerOverride.from_dict({"pattern": "*.attn.*", "exclude": True}),
        ),
        alpha_grid=(0.1, 0.9),
    )
    back = _json_round_trip(r)
    assert back == r
    assert back.overrides[0].changes == (("weight", "int4"), ("weight_granularity", "channel"))
    assert back.alpha_grid == (0.1, 0.9)


def test_switch_strings_parse():
    r = recipe("w8a8-segquant:dual=off,gptq=on,lowrank=16")
    assert (r.dual, r.gptq, r.lowrank, r.seg, r.smooth) == (False, True, 16, True, True)
    assert r.name == "w8a8-segquant:dual=off,gptq=on,lowrank=16"
    r = recipe("w8a8-smooth: search = off , alpha = 0.3 ")
    assert (r.search, r.alpha) == (False, 0.3)
    assert r.resolve("x", None).alpha_grid == (0.3,)
    for value, expect in (
        ("on", True),
        ("true", True),
        ("1", True),
        ("yes", True),
        ("off", False),
        ("false", False),
        ("0", False),
        ("no", False),
    ):
        assert recipe(f"w8a8:seg={value}").seg is expect
    # keyword switches work on top of a string and on a Recipe
    r = recipe("w8a8-segquant:dual=off", gptq=True)
    assert (r.dual, r.gptq) == (False, True)
    assert recipe(r, lowrank=4).lowrank == 4
    assert r.with_switches(seg=False).seg is False


def test_bad_names_and_switches_raise_value_errors_listing_allowed_values():
    with pytest.raises(ValueError, match=r"unknown recipe 'w9a9'.*fp, w8a8, w8a8-smooth, w8a8-segquant"):
        recipe("w9a9")
    with pytest.raises(
        ValueError, match=r"unknown recipe switch 'turbo'.*seg, dual, smooth, gptq, lowrank, alpha, search"
    ):
        recipe("w8a8:turbo=on")
    with pytest.raises(ValueError, match="on/off"):
        recipe("w8a8:dual=maybe")
    with pytest.raises(ValueError, match="key=value"):
        recipe("w8a8:dual")
    with pytest.raises(ValueError, match="integer"):
        recipe("w8a8:lowrank=big")
    with pytest.raises(ValueError, match="number"):
        recipe("w8a8:alpha=half")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        recipe("w8a8-smooth:alpha=1.5")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        recipe("w8a8", alpha_grid=(0.0, 2.0))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        recipe("w8a8", alpha_grid=())
    with pytest.raises(ValueError, match="unknown recipe fields"):
        recipe("w8a8", turbo=True)
    with pytest.raises(ValueError, match="int8, int4, fp8_e4m3"):
        recipe("w8a8", weight="int5")
    with pytest.raises(ValueError, match="lowrank"):
        recipe("w8a8", lowrank=-1)
    with pytest.raises(ValueError, match="version"):
        Recipe("x", version=2)


def test_bad_serialised_recipes_raise():
    d = recipe("w8a8").to_dict()
    with pytest.raises(ValueError, match="_type"):
        Recipe.from_dict({**d, "_type": "other"})
    with pytest.raises(ValueError, match="unknown fields"):
        Recipe.from_dict({**d, "_data": {**d["_data"], "bogus": 1}})
    with pytest.raises(ValueError, match="pattern"):
        LayerOverride.from_dict({"weight": "int4"})
    with pytest.raises(ValueError, match=r"unknown keys.*allowed: exclude"):
        LayerOverride.from_dict({"pattern": "*", "colour": "red"})


def test_b7_static_per_token_recipe_rejected():
    with pytest.raises(ValueError, match="dynamic"):
        recipe("w8a8", activation_granularity="token")
    assert recipe("w8a8", activation_granularity="token", dynamic=True).dynamic


# §11.2 item 36: per-layer override and exclude by glob --------------------------------------------------------
def test_item36_exclude_and_override_by_glob():
    r = recipe(
        "w8a8-segquant",
        excludes=("time_embed.*",),
        overrides=(
            LayerOverride.from_dict(
                {"pattern": "blocks.*.ff.net.2", "weight": "int4", "weight_granularity": "channel"}
            ),
            LayerOverride.from_dict({"pattern": "blocks.1.*", "exclude": True}),
            LayerOverride.from_dict({"pattern": "blocks.0.ff.*", "weight": "fp8_e4m3", "activation": "fp8_e4m3"}),
        ),
    )
    assert r.resolve("time_embed.linear_1", None) is None
    assert r.resolve("blocks.1.attn.to_q", None) is None
    assert r.resolve("blocks.1.ff.net.2", None) is None  # exclude override applies after the int4 one
    s = r.resolve("blocks.2.ff.net.2", None)
    assert s.weight.fmt is QuantFormat.INT4 and s.weight.granularity is Granularity.CHANNEL
    s = r.resolve("blocks.0.ff.net.2", None)  # later overrides win
    assert s.weight.fmt is QuantFormat.FP8_E4M3 and s.activation.fmt is QuantFormat.FP8_E4M3
    s = r.resolve("blocks.2.attn.to_q", None)
    assert s.weight.fmt is QuantFormat.INT8 and s.weight.granularity is Granularity.TENSOR
    # fnmatch is case-sensitive and anchored
    assert r.resolve("xtime_embed.linear_1", None) is not None


def test_override_can_switch_features_off_per_layer():
    r = recipe(
        "w8a8-segquant", overrides=(LayerOverride.from_dict({"pattern": "*.norm1.*", "seg": False, "dual": False}),)
    )
    s = r.resolve(SEG_DUAL.layer, SEG_DUAL)
    assert s.segments is None and s.activation.dual is False
    other = LayerPlan("blk.ff.linear", Segments("in", (4, 4)), True)
    s = r.resolve(other.layer, other)
    assert s.segments == Segments("in", (4, 4)) and s.activation.dual is True


# B8: every recipe / switch combination constructs (no KeyError) -------------------------------------------------
def test_b8_every_switch_combination_constructs():
    bools = ("seg", "dual", "smooth", "gptq", "search")
    count = 0
    for name in PRESETS:
        for values in itertools.product(("on", "off"), repeat=len(bools)):
            for extra in ("", ",lowrank=0", ",lowrank=16,alpha=0", ",alpha=1"):
                spec = name + ":" + ",".join(f"{k}={v}" for k, v in zip(bools, values)) + extra
                r = recipe(spec)
                assert r.seg is (values[0] == "on") and r.search is (values[4] == "on")
                resolved = r.resolve(SEG_DUAL.layer, SEG_DUAL)
                assert (resolved is None) == (name == "fp")
                if resolved is not None:
                    assert resolved.alpha_grid == (DEFAULT_ALPHA_GRID if r.search else (float(r.alpha),))
                assert _json_round_trip(r) == r
                count += 1
    assert count == len(PRESETS) * 32 * 4
    # the reference's crashing ablation ("dualscale" with search on but no grid given) just uses the default grid
    assert recipe("w8a8-segquant:dual=on,search=on").alpha_grid == DEFAULT_ALPHA_GRID


def test_plus_separates_switches_inside_comma_lists() -> None:
    from segquant_core.recipes import recipe as make

    r = make("w8a8-smooth:seg=on+dual=on")
    assert r.seg and r.dual and r.smooth
    assert make("w8a8-smooth:seg=on,dual=on") == r.with_switches(name="w8a8-smooth:seg=on,dual=on")


def test_per_segment_dual_follows_the_plan_only_with_segments_and_dual_on():
    """A plan with DualScale on some in-segments: ``seg=on,dual=on`` keeps the flags per segment; without
    segments the layer is dual only if all of its input is; ``dual=off`` switches it off everywhere."""
    mixed = LayerPlan("proj_out", Segments("in", (32, 64)), (False, True))
    spec = recipe("w8a8-segquant").resolve("proj_out", mixed)
    assert spec.segments == mixed.segments and spec.dual_segments == (False, True) and spec.activation.dual
    unsegmented = recipe("w8a8-segquant:seg=off").resolve("proj_out", mixed)
    assert unsegmented.segments is None and unsegmented.dual_segments is None and not unsegmented.activation.dual
    off = recipe("w8a8-segquant:dual=off").resolve("proj_out", mixed)
    assert off.dual_segments is None and not off.activation.dual
    whole = LayerPlan("proj_out", Segments("in", (32, 64)), True)  # every segment: the plain per-layer flag
    for r in ("w8a8-segquant", "w8a8-segquant:seg=off"):
        spec = recipe(r).resolve("proj_out", whole)
        assert spec.activation.dual and spec.dual_segments is None
