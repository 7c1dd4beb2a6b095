"""Format-2 checkpoints: load without the float denoiser, bit-identical to loading into a float model; one
resident copy of each weight; save/export from a loaded model; staleness; format-1 compatibility."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import segquant_core as sq
from segquant_core.artifacts import ArtifactError, read_manifest
from segquant_core.detect.examples import example_inputs_for
from segquant_core.seglinear import SegLinear

segquant_shapes = pytest.importorskip("segquant_shapes")

PROMPTS = ["a red circle", "a blue square"]


def _pipeline_checkpoint(tmp_path, kind: str, recipe: str = "w8a8-segquant"):
    pipe = segquant_shapes.tiny_random_pipeline(kind)
    sq.quantize_pipeline(pipe, recipe, PROMPTS, num_inference_steps=4, steps_per_prompt=2, progress=False)
    return sq.save(sq.denoiser_of(pipe), tmp_path / f"{kind}-{recipe}")


def _images(pipe) -> torch.Tensor:
    with torch.no_grad():
        return pipe(
            ["a red circle", "a green star"],
            num_inference_steps=3,
            output_type="pt",
            generator=[torch.Generator().manual_seed(i) for i in range(2)],
        ).images


class FloatShapes(TorchDispatchMode):
    """Records the shape of every floating-point tensor an op produces off the meta device."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: set[tuple[int, ...]] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and not t.is_meta and t.is_floating_point():
                self.shapes.add(tuple(t.shape))
        return out


@pytest.mark.parametrize(
    "kind,recipe", [("mmdit", "w8a8-segquant"), ("unet", "w8a8-segquant"), ("mmdit", "w4a8-segquant")]
)
def test_checkpoint_gives_the_same_images_as_loading_into_the_float_pipeline(tmp_path, kind, recipe):
    d = _pipeline_checkpoint(tmp_path, kind, recipe)
    today = segquant_shapes.tiny_random_pipeline(kind)
    sq.load_into_pipeline(d, today)
    new = segquant_shapes.tiny_random_pipeline(kind)
    denoiser = sq.load_denoiser(d)
    sq.replace_denoiser(new, denoiser)
    assert sq.denoiser_of(new) is denoiser
    assert torch.equal(_images(today), _images(new))


def test_flux_checkpoint_gives_the_same_outputs(tmp_path):
    from tests.detect.detect_tiny_models import tiny_flux

    model = tiny_flux()
    calls = [example_inputs_for(model) for _ in range(2)]
    sq.quantize(model, "w8a8-segquant", calls, progress=False)
    d = sq.save(model, tmp_path / "flux")
    loaded = sq.load_denoiser(d)
    assert type(loaded).__name__ == "FluxTransformer2DModel"
    with torch.no_grad():
        assert torch.equal(model(**calls[0])[0], loaded(**calls[0])[0])
    # per-segment DualScale survives the round trip: attention | GELU-MLP, the MLP segment alone is dual
    name = "single_transformer_blocks.0.proj_out"
    manifest = read_manifest(d)
    assert manifest["layers"][name]["dual_segments"] == [False, True]
    assert next(r for r in manifest["plan"] if r["layer"] == name)["dual_scale"] == [False, True]
    for m in (model, loaded):
        layer = m.get_submodule(name)
        assert layer.cfg.dual_segments == (False, True)
        assert [s.act_scale.numel() for s in layer.segs] == [1, 2]
    assert torch.equal(loaded.get_submodule(name).segs[1].act_scale, model.get_submodule(name).segs[1].act_scale)


def test_loading_never_allocates_the_float_weights_of_quantized_layers(tmp_path):
    d = _pipeline_checkpoint(tmp_path, "mmdit")
    quantized = {(c["out_features"], c["in_features"]) for c in read_manifest(d)["layers"].values()}
    with safe_open(str(d / "model.safetensors"), framework="pt") as f:
        kept = {tuple(f.get_slice(k).get_shape()) for k in f.keys() if ".segs." not in k}  # noqa: SIM118
    watched = quantized - kept
    assert watched
    with FloatShapes() as rec:  # positive control: building the float model does allocate them
        segquant_shapes.tiny_random_pipeline("mmdit")
    assert watched <= rec.shapes
    with FloatShapes() as rec:
        model = sq.load_denoiser(d, dtype=torch.bfloat16)
    assert not watched & rec.shapes
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()] if t.dtype.is_floating_point)


def test_float_tensors_take_the_reference_precision_and_quantized_ones_stay(tmp_path):
    d = _pipeline_checkpoint(tmp_path, "mmdit")
    model = sq.load_denoiser(d, dtype=torch.bfloat16)
    layers = [m for m in model.modules() if isinstance(m, SegLinear)]
    assert layers
    owned = {id(t) for m in layers for t in m.buffers()}
    floats = [t for t in [*model.parameters(), *model.buffers()] if id(t) not in owned and t.is_floating_point()]
    assert floats and all(t.dtype == torch.bfloat16 for t in floats)
    assert all(s.weight_scale.dtype == torch.float32 for m in layers for s in m.segs)


def test_one_resident_copy_and_save_from_a_loaded_model(tmp_path):
    d = _pipeline_checkpoint(tmp_path, "mmdit")
    model = sq.load_denoiser(d)
    layers = [m for m in model.modules() if isinstance(m, SegLinear)]
    assert all(m.codes_released for m in layers)  # the oneDNN prepack is the only copy of the codes
    assert all(s.weight.is_meta for m in layers for s in m.segs)
    file_bytes = (d / "model.safetensors").stat().st_size
    codes_bytes = sum(s.weight.numel() * s.weight.element_size() for m in layers for s in m.segs)
    loaded = sq.resident_bytes(model)
    # codes once (in the kernel), float weights once; the kernels add only per-column scale vectors
    # (a second copy of the codes would add codes_bytes)
    assert file_bytes * 0.95 <= loaded <= file_bytes + 0.25 * codes_bytes
    # a small-M call packs the fbgemm kernel for the layers that see it, once, and it is counted
    call = example_inputs_for(model, batch=1)
    with torch.no_grad():
        model(**call)
    after_one = sq.resident_bytes(model)
    with torch.no_grad():
        model(**call)
    assert after_one > loaded and sq.resident_bytes(model) == after_one
    # saving re-derives the codes from the kernels: the same tensors as the file it was loaded from
    again = sq.save(model, tmp_path / "again")
    with (
        safe_open(str(d / "model.safetensors"), framework="pt") as a,
        safe_open(str(again / "model.safetensors"), framework="pt") as b,
    ):
        assert sorted(a.keys()) == sorted(b.keys())
        for k in a.keys():  # noqa: SIM118 (safe_open is not a dict)
            assert torch.equal(a.get_tensor(k), b.get_tensor(k)), k
    assert all(m.codes_released for m in layers)  # saving did not keep a second copy


def test_format_1_loads_into_a_float_model_and_load_denoiser_says_how_to_convert(tmp_path):
    d = _pipeline_checkpoint(tmp_path, "mmdit")
    manifest = read_manifest(d)
    with safe_open(str(d / "model.safetensors"), framework="pt") as f:
        quantized = {
            k: f.get_tensor(k)
            for k in f.keys()  # noqa: SIM118
            if any(k.startswith(n + ".") for n in manifest["layers"])
        }
    old = tmp_path / "v1"
    old.mkdir()
    save_file(quantized, str(old / "quantized.safetensors"))
    (old / "manifest.json").write_text(json.dumps({**manifest, "format_version": 1}))
    with pytest.raises(ArtifactError, match=r"format-1 artifacts .* sq\.save"):
        sq.load_denoiser(old)
    pipe = segquant_shapes.tiny_random_pipeline("mmdit")
    sq.load_into_pipeline(old, pipe)
    converted = sq.save(sq.denoiser_of(pipe), tmp_path / "v2")
    new = segquant_shapes.tiny_random_pipeline("mmdit")
    sq.replace_denoiser(new, sq.load_denoiser(converted))
    assert torch.equal(_images(pipe), _images(new))


def test_checkpoint_status_names_what_changed(tmp_path):
    pipe = segquant_shapes.tiny_random_pipeline("mmdit")
    sq.quantize_pipeline(
        pipe, "w8a8-segquant", PROMPTS, num_inference_steps=4, steps_per_prompt=2, seed=3, progress=False
    )
    d = sq.save(sq.denoiser_of(pipe), tmp_path / "c", source={"weights_sha256": "abc"})
    settings = sq.calibration_settings(PROMPTS, num_inference_steps=4, steps_per_prompt=2, guidance_scale=None, seed=3)
    assert sq.checkpoint_is_current(d, "w8a8-segquant", calibration=settings, source_sha256="abc")
    assert not sq.checkpoint_is_current(d, "w8a8-segquant:dual=off")
    status = sq.checkpoint_status(d, "w8a8-segquant", calibration={**settings, "seed": 4})
    assert not status and "seed" in status.reason
    assert "source weights" in sq.checkpoint_status(d, "w8a8-segquant", source_sha256="xyz").reason
    manifest = json.loads((d / "manifest.json").read_text())
    manifest["engine"]["numerics"] = 0
    (d / "manifest.json").write_text(json.dumps(manifest))
    assert "numerics 0" in sq.checkpoint_status(d, "w8a8-segquant").reason
    assert "no manifest.json" in sq.checkpoint_status(tmp_path / "missing", "w8a8-segquant").reason
