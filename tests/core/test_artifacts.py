"""segquant_core.artifacts: save/load round trip, file contents, validation, no pickle, atomic writes, sizes."""

from __future__ import annotations

import importlib
import json
import pickle

import pytest
import torch
from safetensors import safe_open
from torch import nn

from segquant_core import ArtifactError, SegLinear, load, quantize, read_manifest, recipe, save
from segquant_core.detect.plan import LayerPlan, Plan

from .conftest import SEG_LAYERS, SegToy, gen, seg_calls, seg_plan

artifacts_mod = importlib.import_module("segquant_core.artifacts")

RECIPES = ["w8a8-segquant", "w4a8-segquant:lowrank=4", "fp8-segquant", "w8a8-smooth:gptq=on"]


def _quantized(spec: str = "w8a8-segquant") -> SegToy:
    m = SegToy()
    quantize(m, spec, seg_calls(), seg_plan(), progress=False)
    return m


@pytest.mark.parametrize("spec", [*RECIPES, "w8a8:seg=on"])
def test_save_load_round_trip_is_bit_identical(tmp_path, spec):
    m = _quantized(spec)
    save(m, tmp_path / "art")
    fresh = SegToy()
    res = load(tmp_path / "art", fresh)
    assert all(isinstance(getattr(fresh, n), SegLinear) for n in SEG_LAYERS)
    for n in SEG_LAYERS:
        assert getattr(fresh, n).cfg == getattr(m, n).cfg
        assert getattr(fresh, n).backend.name == getattr(m, n).backend.name
    for seed in (1, 2):
        call = seg_calls(n=1, seed=seed)[0]
        with torch.no_grad():
            assert torch.equal(fresh(**call), m(**call))
    # the reports and the recipe come back too
    assert res.recipe == m.segquant.recipe and res.plan == m.segquant.plan
    assert {n: [s.alpha for s in r.segments] for n, r in res.layers.items()} == {
        n: [s.alpha for s in r.segments] for n, r in m.segquant.layers.items()
    }
    assert res.quantized_bytes == m.segquant.quantized_bytes
    assert fresh.segquant is res


def test_weight_only_round_trip_with_excluded_layer(tmp_path):
    m = SegToy()
    quantize(m, recipe("w8a8", activation=None, excludes=("q",)), seg_calls(), seg_plan(), progress=False)
    save(m, tmp_path / "a")
    fresh = SegToy()
    res = load(tmp_path / "a", fresh)
    assert type(fresh.q) is nn.Linear and res.excluded == ["q"]
    call = seg_calls(n=1)[0]
    with torch.no_grad():
        assert torch.equal(fresh(**call), m(**call))


def test_safetensors_holds_low_bit_codes_and_fp32_scales(tmp_path):
    expected = {"w8a8-segquant": torch.int8, "w4a8-segquant": torch.uint8, "fp8-segquant": torch.float8_e4m3fn}
    for spec, code_dtype in expected.items():
        m = _quantized(spec)
        d = save(m, tmp_path / spec)
        with safe_open(str(d / "model.safetensors"), framework="pt") as f:
            keys = list(f.keys())
            dtypes = {k: f.get_tensor(k).dtype for k in keys}
            assert f.metadata() == {"format": "segquant-artifact", "format_version": "2"}
        weights = [k for k in keys if k.endswith(".weight") and ".segs." in k]
        assert len(weights) == 3 + 1 + 1 + 2 + 1  # ada: 3 out-segments, q, k, proj: 2 in-segments, ff
        assert all(dtypes[k] == code_dtype for k in weights), spec
        scales = [k for k in keys if k.endswith(("weight_scale", "act_scale", "smooth"))]
        assert scales and all(dtypes[k] == torch.float32 for k in scales)
        assert "ada.segs.2.weight" in keys and "proj.segs.1.weight_scale" in keys and "ff.bias" in keys
        # only the quantized layers are stored, no float copies of the original weights
        assert not any(k.endswith(("ada.weight", "q.weight")) for k in keys)
        if spec == "w4a8-segquant":
            with safe_open(str(d / "model.safetensors"), framework="pt") as f:
                assert tuple(f.get_tensor("q.segs.0.weight").shape) == (32, 16)  # K/2 packed bytes
        manifest = read_manifest(d)
        assert manifest["layers"]["ada"]["segments"] == {"axis": "out", "sizes": [32, 32, 32]}
        assert manifest["recipe"]["_data"]["name"] == spec


def test_load_into_mismatching_model_names_the_first_bad_layer(tmp_path):
    d = save(_quantized(), tmp_path / "a")
    # a model without 'ada'
    fresh = SegToy()
    fresh.ada_renamed = fresh.ada
    del fresh.ada
    with pytest.raises(ArtifactError, match="'ada' does not exist"):
        load(d, fresh)
    # a model whose 'proj' has other sizes (every earlier layer matches)
    fresh = SegToy()
    fresh.proj = nn.Linear(48, 16)
    before = {n: getattr(fresh, n) for n in SEG_LAYERS}
    with pytest.raises(ArtifactError, match=r"'proj' is 48→32 but the model's is 48→16"):
        load(d, fresh)
    # nothing was replaced: the load validates every layer before changing the model
    assert all(getattr(fresh, n) is before[n] for n in SEG_LAYERS)
    # a layer that is not a Linear
    fresh = SegToy()
    fresh.ff = nn.Sequential(nn.Linear(32, 32))
    with pytest.raises(ArtifactError, match="'ff' is a Sequential"):
        load(d, fresh)


def test_load_never_unpickles(tmp_path, monkeypatch):
    d = save(_quantized("w4a8-segquant:lowrank=4"), tmp_path / "a")

    def forbidden(*_a, **_k):
        raise AssertionError("load() must not unpickle")

    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    fresh = SegToy()
    load(d, fresh)
    assert isinstance(fresh.ada, SegLinear)
    assert not any(p.suffix in (".pt", ".pth", ".bin", ".pkl") for p in d.iterdir())
    assert sorted(p.name for p in d.iterdir()) == ["manifest.json", "model.safetensors"]  # no config: not diffusers


def test_bad_manifests_raise_artifact_error(tmp_path):
    d = save(_quantized(), tmp_path / "a")
    manifest_path = d / "manifest.json"
    good = json.loads(manifest_path.read_text())
    for change, msg in (
        ({"format_version": 3}, "version 3 is not supported"),
        ({"format": "something-else"}, "not a segquant artifact"),
    ):
        manifest_path.write_text(json.dumps({**good, **change}))
        with pytest.raises(ArtifactError, match=msg):
            load(d, SegToy())
    manifest_path.write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        read_manifest(d)
    with pytest.raises(ArtifactError, match=r"no manifest\.json"):
        read_manifest(tmp_path / "missing")
    assert issubclass(ArtifactError, ValueError)


def test_tensors_that_do_not_match_the_config_raise(tmp_path):
    from safetensors.torch import load_file, save_file

    d = save(_quantized(), tmp_path / "a")
    tensors = load_file(str(d / "model.safetensors"))
    del tensors["proj.segs.1.weight_scale"]
    save_file(tensors, str(d / "model.safetensors"))
    with pytest.raises(ArtifactError, match="'proj'"):
        load(d, SegToy())


def test_save_replaces_an_existing_artifact_atomically(tmp_path, monkeypatch):
    target = tmp_path / "art"
    save(_quantized("w8a8-segquant"), target)
    (target / "stray.txt").write_text("left over")
    save(_quantized("fp8-segquant"), target)
    assert read_manifest(target)["recipe"]["_data"]["name"] == "fp8-segquant"
    assert not (target / "stray.txt").exists()  # replaced as a whole, not merged
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]  # no temporary or old folders left

    # a save that fails half-way leaves the previous artifact intact and no temporary folder behind
    def broken_save_file(*_a, **_k):
        raise OSError("disk full")

    monkeypatch.setattr(artifacts_mod, "save_file", broken_save_file)
    with pytest.raises(OSError, match="disk full"):
        save(_quantized("w4a8-segquant"), target)
    assert read_manifest(target)["recipe"]["_data"]["name"] == "fp8-segquant"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]
    fresh = SegToy()
    load(target, fresh)
    assert fresh.ada.cfg.weight.fmt.value == "fp8_e4m3"


def test_save_requires_a_quantized_model(tmp_path):
    with pytest.raises(ArtifactError, match="not quantized"):
        save(SegToy(), tmp_path / "a")
    assert not (tmp_path / "a").exists()


def test_load_warns_when_float_weights_differ(tmp_path, caplog):
    class WithNorm(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.norm = nn.LayerNorm(16)
            self.lin = nn.Linear(16, 16)

        def forward(self, x):
            return self.lin(self.norm(x))

    m = WithNorm()
    quantize(m, "w8a8", [{"x": torch.randn(8, 16, generator=gen(1))}], Plan([LayerPlan("lin")]), progress=False)
    d = save(m, tmp_path / "a")
    same = WithNorm()
    with caplog.at_level("WARNING"):
        load(d, same)
    assert "differ" not in caplog.text
    other = WithNorm()
    with torch.no_grad():
        other.norm.weight.mul_(2)
    with caplog.at_level("WARNING"):
        load(d, other)
    assert "differ from the model this artifact was calibrated on" in caplog.text


# storage size of the quantized weights --------------------------------------------------------------------------
class Wide(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(256, 256)
        self.fc2 = nn.Linear(256, 256)

    def forward(self, x):
        return self.fc2(torch.nn.functional.gelu(self.fc1(x)))


@pytest.mark.parametrize(
    "spec,ratio", [("w8a8", 0.51), ("w8a8:dual=on", 0.51), ("fp8-segquant", 0.51), ("w4a8-segquant:smooth=off", 0.27)]
)
def test_weight_bytes_vs_bf16(tmp_path, spec, ratio):
    m = Wide()
    bf16_bytes = {n: sum(p.numel() * 2 for p in getattr(m, n).parameters()) for n in ("fc1", "fc2")}
    plan = Plan([LayerPlan("fc1"), LayerPlan("fc2", None, True)])
    quantize(m, spec, [{"x": torch.randn(64, 256, generator=gen(1))}], plan, progress=False)
    d = save(m, tmp_path / "a")
    with safe_open(str(d / "model.safetensors"), framework="pt") as f:
        stored = {
            n: sum(
                f.get_tensor(k).numel() * f.get_tensor(k).element_size()
                for k in f.keys()  # noqa: SIM118 (safe_open is not a dict)
                if k.startswith(n + ".")
            )
            for n in ("fc1", "fc2")
        }
    for n in ("fc1", "fc2"):
        layer: SegLinear = getattr(m, n)
        assert layer.weight_nbytes() == stored[n]  # codes + scales + bias, everything the layer stores
        assert stored[n] <= ratio * bf16_bytes[n], (n, stored[n], bf16_bytes[n])
