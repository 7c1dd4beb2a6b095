"""LoRA side branch: exact on float layers, within quantization error on SegLinear, stack/unload, bad files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import segquant_core as sq
from segquant_core.quantize import quantize

from .conftest import SEG_LAYERS, SegToy, gen, rel_err, seg_calls, seg_plan

RANK = 4


def lora_tensors(
    model: torch.nn.Module, seed: int, magnitude: float = 0.3, layers: tuple[str, ...] = SEG_LAYERS
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{layer: (A [r, in], B [out, r])} whose update is about ``magnitude`` of the layer's weight norm."""
    g = gen(seed)
    out = {}
    for name in layers:
        lin = model.get_submodule(name)
        a = torch.randn(RANK, lin.in_features, generator=g)
        b = torch.randn(lin.out_features, RANK, generator=g)
        ba = b @ a
        b *= magnitude * float(lin.weight.detach().norm() / ba.norm())
        out[name] = (a, b)
    return out


def write_diffusers(path: Path, pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> Path:
    tensors = {}
    for name, (a, b) in pairs.items():
        tensors[f"transformer.{name}.lora_A.weight"] = a.contiguous()
        tensors[f"transformer.{name}.lora_B.weight"] = b.contiguous()
    save_file(tensors, str(path))
    return path


def merged(model: SegToy, pairs: dict[str, tuple[torch.Tensor, torch.Tensor]], scale: float = 1.0) -> SegToy:
    """A float copy of ``model`` with ``W + scale · B A`` in every adapted layer (the reference)."""
    m = SegToy()
    m.load_state_dict(model.state_dict())
    with torch.no_grad():
        for name, (a, b) in pairs.items():
            m.get_submodule(name).weight += scale * (b @ a)
    return m


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every stored tensor (codes, scales, smoothing, float weights), copied."""
    return {k: v.clone() for k, v in model.state_dict().items() if not v.is_meta}


def test_fp_layers_equal_w_x_plus_b_a_x(tmp_path):
    model = SegToy()
    pairs = lora_tensors(model, seed=3)
    info = sq.load_lora(model, write_diffusers(tmp_path / "a.safetensors", pairs), "style", scale=0.7)
    assert info.layers == tuple(sorted(SEG_LAYERS)) and info.rank == RANK
    x = torch.randn(5, model.d, generator=gen(4))
    for name, (a, b) in pairs.items():
        lin = model.get_submodule(name)
        xin = torch.randn(5, lin.in_features, generator=gen(5))
        ref = xin @ lin.weight.t() + lin.bias + 0.7 * (xin @ a.t()) @ b.t()
        torch.testing.assert_close(lin(xin), ref, rtol=1e-5, atol=1e-5)
    call = seg_calls(n=1, seed=9)[0]
    with torch.no_grad():
        torch.testing.assert_close(model(**call), merged(SegToy(), pairs, 0.7)(**call), rtol=1e-4, atol=1e-5)
    del x


@pytest.mark.parametrize("spec", ["w8a8-segquant", "w4a8-segquant"])
def test_seglinear_matches_merged_fake_quant_and_keeps_codes(tmp_path, spec):
    calls = seg_calls(n=4)
    model = SegToy()
    pairs = lora_tensors(model, seed=7)
    path = write_diffusers(tmp_path / "a.safetensors", pairs)
    fp_merged = merged(SegToy(), pairs)
    # Merge-then-requantize with fake quant (the reference backend): what the side branch replaces.
    requant = merged(SegToy(), pairs)
    quantize(requant, spec, calls, seg_plan(), backend="reference", progress=False)
    quantize(model, spec, calls, seg_plan(), progress=False)
    assert all(isinstance(model.get_submodule(n), sq.SegLinear) for n in SEG_LAYERS)
    codes = state(model)
    call = seg_calls(n=1, seed=9)[0]
    with torch.no_grad():
        base = model(**call)
        ref, ref_q = fp_merged(**call), requant(**call)
    sq.load_lora(model, path, "style")
    with torch.no_grad():
        out = model(**call)
    tol = 0.05 if spec.startswith("w8") else 0.15  # the same bounds as quantized-vs-float in test_quantize
    assert rel_err(base, ref) > 2 * tol  # the adapter matters: without it the output is far from the merged model
    assert rel_err(out, ref) < tol
    # No worse than merging and requantizing (the codes of the base weight are kept; only the branch is float).
    assert rel_err(out, ref) < 1.5 * rel_err(ref_q, ref)
    assert rel_err(out, ref_q) < 2 * tol
    # Per layer the branch adds exactly B A x on the raw input, whatever the quantizer did.
    lin = model.get_submodule("proj")
    xin = torch.randn(6, lin.in_features, generator=gen(2))
    sq.set_adapters(model, {})
    with torch.no_grad():
        plain = lin(xin)
    sq.set_adapters(model, {"style": 1.0})
    with torch.no_grad():
        a, b = pairs["proj"]
        torch.testing.assert_close(lin(xin), plain + (xin @ a.t()) @ b.t(), rtol=1e-5, atol=1e-5)
    after = state(model)
    assert after.keys() == codes.keys() and all(torch.equal(after[k], codes[k]) for k in codes)
    sq.unload_lora(model, "style")
    with torch.no_grad():
        assert torch.equal(model(**call), base)


def test_stack_scale_disable_unload(tmp_path):
    model = SegToy()
    before = state(model)
    p1, p2 = lora_tensors(model, seed=1), lora_tensors(model, seed=2, layers=("q", "ff"))
    sq.load_lora(model, write_diffusers(tmp_path / "1.safetensors", p1), "one", activate=False)
    sq.load_lora(model, write_diffusers(tmp_path / "2.safetensors", p2), "two", activate=False)
    assert sq.active_adapters(model) == {} and set(sq.list_loras(model)) == {"one", "two"}
    call = seg_calls(n=1, seed=9)[0]
    with torch.no_grad():
        plain = SegToy()(**call)
        assert torch.equal(model(**call), plain)  # loaded but inactive: no effect
        sq.set_adapters(model, {"one": 0.5, "two": 2.0})
        both = {n: (a, b) for n, (a, b) in p1.items()}
        stacked = merged(SegToy(), both, 0.5)
        for n, (a, b) in p2.items():
            stacked.get_submodule(n).weight.data += 2.0 * (b @ a)
        torch.testing.assert_close(model(**call), stacked(**call), rtol=1e-4, atol=1e-5)
        sq.set_adapters(model, {"two": 2.0})
        torch.testing.assert_close(model(**call), merged(SegToy(), p2, 2.0)(**call), rtol=1e-4, atol=1e-5)
        sq.set_adapters(model, {"one": 1.0, "two": 2.0})
        sq.unload_lora(model, "one")
        assert sq.active_adapters(model) == {"two": 2.0}
        assert not model.ada._forward_hooks and model.q._forward_hooks  # "one" alone adapted ada
        torch.testing.assert_close(model(**call), merged(SegToy(), p2, 2.0)(**call), rtol=1e-4, atol=1e-5)
        sq.unload_lora(model)
        assert sq.list_loras(model) == {} and all(not model.get_submodule(n)._forward_hooks for n in SEG_LAYERS)
        assert torch.equal(model(**call), plain)
    after = state(model)
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_kohya_and_legacy_layouts_with_alpha(tmp_path):
    model = SegToy()
    pairs = lora_tensors(model, seed=5, layers=("q", "proj"))
    kohya = {}
    for name, (a, b) in pairs.items():
        kohya[f"lora_unet_{name}.lora_down.weight"] = a
        kohya[f"lora_unet_{name}.lora_up.weight"] = b
        kohya[f"lora_unet_{name}.alpha"] = torch.tensor(2.0)  # alpha / r = 0.5
    save_file(kohya, str(tmp_path / "k.safetensors"))
    legacy = {f"{n}.lora.{r}.weight": t for n, (a, b) in pairs.items() for r, t in (("down", a), ("up", b))}
    save_file(legacy, str(tmp_path / "l.safetensors"))
    call = seg_calls(n=1, seed=9)[0]
    with torch.no_grad():
        sq.load_lora(model, tmp_path / "k.safetensors", "k")
        torch.testing.assert_close(model(**call), merged(SegToy(), pairs, 2.0 / RANK)(**call), rtol=1e-4, atol=1e-5)
        sq.set_adapters(model, {})
        sq.load_lora(model, tmp_path / "l.safetensors", "legacy")
        torch.testing.assert_close(model(**call), merged(SegToy(), pairs, 1.0)(**call), rtol=1e-4, atol=1e-5)


def test_fuse_matches_branch_and_refuses_quantized(tmp_path):
    model = SegToy()
    pairs = lora_tensors(model, seed=6)
    path = write_diffusers(tmp_path / "a.safetensors", pairs)
    call = seg_calls(n=1, seed=9)[0]
    sq.load_lora(model, path, "a", scale=0.5)
    with torch.no_grad():
        branch = model(**call)
        assert sq.fuse_lora(model) == sorted(SEG_LAYERS)
        assert sq.list_loras(model) == {}
        torch.testing.assert_close(model(**call), branch, rtol=1e-5, atol=1e-5)
    q = SegToy()
    quantize(q, "w8a8-segquant", seg_calls(n=2), seg_plan(), progress=False)
    sq.load_lora(q, path, "a")
    with pytest.raises(sq.LoraError, match="quantized"):
        sq.fuse_lora(q)


def test_bad_files_and_keys_are_clear_errors(tmp_path):
    model = SegToy()
    before = state(model)
    good = lora_tensors(model, seed=1)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sq.load_lora(model, tmp_path / "missing.safetensors", "x")
    (tmp_path / "w.bin").write_bytes(b"\x80\x04 pickle")
    with pytest.raises(sq.LoraError, match=r"only \.safetensors"):
        sq.load_lora(model, tmp_path / "w.bin", "x")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(sq.LoraError, match="not a readable safetensors"):
        sq.load_lora(model, tmp_path / "junk.safetensors", "x")
    wrong_name = dict(good)
    wrong_name["blocks.0.to_q"] = tuple(t.clone() for t in good["q"])
    with pytest.raises(sq.LoraError, match=r"'blocks\.0\.to_q' matches no linear layer"):
        sq.load_lora(model, write_diffusers(tmp_path / "n.safetensors", wrong_name), "x")
    a, b = good["q"]
    with pytest.raises(sq.LoraError, match=r"layer 'q' is 32x32"):
        sq.load_lora(model, write_diffusers(tmp_path / "s.safetensors", {"q": (torch.randn(RANK, 16), b)}), "x")
    save_file({"transformer.q.lora_A.weight": a}, str(tmp_path / "half.safetensors"))
    with pytest.raises(sq.LoraError, match=r"'q' has no up \(lora_B\)"):
        sq.load_lora(model, tmp_path / "half.safetensors", "x")
    save_file(
        {
            "transformer.q.lora_A.weight": a,
            "transformer.q.lora_B.weight": b,
            "text_encoder.layer.lora_A.weight": a.clone(),
            "text_encoder.layer.lora_B.weight": b.clone(),
        },
        str(tmp_path / "te.safetensors"),
    )
    with pytest.raises(sq.LoraError, match="text encoder"):
        sq.load_lora(model, tmp_path / "te.safetensors", "x")
    save_file({"transformer.q.weight": a}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(sq.LoraError, match="not a LoRA key"):
        sq.load_lora(model, tmp_path / "plain.safetensors", "x")
    assert sq.list_loras(model) == {} and all(not model.get_submodule(n)._forward_hooks for n in SEG_LAYERS)
    assert all(torch.equal(model.state_dict()[k], before[k]) for k in before)
    info = sq.load_lora(model, tmp_path / "te.safetensors", "te", skip_text_encoder=True)
    assert info.layers == ("q",)
    with pytest.raises(sq.LoraError, match="already loaded"):
        sq.load_lora(model, tmp_path / "te.safetensors", "te", skip_text_encoder=True)
    with pytest.raises(sq.LoraError, match=r"unknown adapter\(s\) 'nope'; loaded: te"):
        sq.set_adapters(model, {"nope": 1.0})
    with pytest.raises(sq.LoraError, match="finite"):
        sq.set_adapters(model, {"te": float("nan")})
    with pytest.raises(sq.LoraError, match="no adapter named 'nope'"):
        sq.unload_lora(model, "nope")
