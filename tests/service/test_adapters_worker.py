"""The worker's side of adapters: the per-denoiser LRU (loads on first use, unloads the least recently used one
not needed now, activates exactly the batch's set, also on a denoiser compiled before) and the batcher, which
never mixes adapter sets."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import segquant_core as sq
from service.jobs.model import AdapterUse, GenerationParams
from service.registry import ModelSpec
from service.worker.adapters import AdapterLoadError, DenoiserAdapters
from service.worker.batching import group_compatible


class TwoLayers(torch.nn.Module):
    """Stands in for a denoiser: the adapter code only sees named linears."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(8, 8)
        self.out = torch.nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.proj(x))


def adapter_file(folder: Path, name: str, seed: int) -> Path:
    g = torch.Generator().manual_seed(seed)
    path = folder / f"{name}.safetensors"
    save_file(
        {
            "transformer.proj.lora_A.weight": torch.randn(2, 8, generator=g),
            "transformer.proj.lora_B.weight": torch.randn(8, 2, generator=g),
        },
        str(path),
    )
    return path


@pytest.fixture
def model(tmp_path: Path) -> ModelSpec:
    adapters = [{"name": n, "path": str(adapter_file(tmp_path, n, i))} for i, n in enumerate(("a", "b", "c"))]
    return ModelSpec.model_validate({"name": "m", "source": "tiny:mmdit", "variants": ["fp"], "adapters": adapters})


def test_loads_on_first_use_and_unloads_the_least_recently_used(model: ModelSpec) -> None:
    denoiser, cache = TwoLayers(), DenoiserAdapters(model, "m:fp", capacity=2)
    assert cache.activate(denoiser, {"a": 1.0}) == ["a"]
    assert cache.activate(denoiser, {"a": 0.5}) == []  # loaded once, whatever the scale
    assert cache.activate(denoiser, {"b": 1.0}) == ["b"]
    assert cache.activate(denoiser, {"a": 1.0}) == []  # a is now the most recently used
    assert cache.activate(denoiser, {"c": 1.0}) == ["c"]  # b goes
    assert cache.loaded == ["a", "c"] and sorted(sq.list_loras(denoiser)) == ["a", "c"]
    assert cache.activate(denoiser, {"b": 1.0, "c": 1.0}) == ["b"]  # a goes, c is needed now
    assert sorted(sq.list_loras(denoiser)) == ["b", "c"] and sq.active_adapters(denoiser) == {"b": 1.0, "c": 1.0}


def test_exactly_the_batchs_set_is_active(model: ModelSpec) -> None:
    denoiser, cache = TwoLayers(), DenoiserAdapters(model, "m:fp", capacity=3)
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = denoiser(x)
        cache.activate(denoiser, {"a": 1.0})
        with_a = denoiser(x)
        cache.activate(denoiser, {"a": 1.0, "b": 2.0})
        with_ab = denoiser(x)
        cache.activate(denoiser, {})
        none_again = denoiser(x)
    assert not torch.allclose(with_a, plain) and not torch.allclose(with_ab, with_a)
    assert torch.equal(none_again, plain)  # loaded but inactive adapters change nothing
    assert sq.active_adapters(denoiser) == {} and sorted(sq.list_loras(denoiser)) == ["a", "b"]


def test_an_adapter_that_does_not_fit_the_denoiser_fails_clearly(tmp_path: Path) -> None:
    wrong = tmp_path / "wrong.safetensors"
    save_file(
        {"transformer.nope.lora_A.weight": torch.zeros(2, 8), "transformer.nope.lora_B.weight": torch.zeros(8, 2)},
        str(wrong),
    )
    model = ModelSpec.model_validate(
        {"name": "m", "source": "tiny:mmdit", "variants": ["fp"], "adapters": [{"name": "w", "path": str(wrong)}]}
    )
    denoiser, cache = TwoLayers(), DenoiserAdapters(model, "m:fp", capacity=2)
    with pytest.raises(AdapterLoadError, match=r"adapter 'w' of model 'm' could not be loaded.*'nope'"):
        cache.activate(denoiser, {"w": 1.0})
    assert cache.loaded == [] and sq.list_loras(denoiser) == {}


def params(seed: int, *loras: tuple[str, float]) -> GenerationParams:
    return GenerationParams(
        prompt="p",
        model="m",
        variant="fp",
        width=32,
        height=32,
        num_inference_steps=2,
        guidance_scale=3.0,
        seeds=[seed],
        loras=[AdapterUse(name=n, scale=s) for n, s in loras],
    )


def test_the_batcher_never_mixes_adapter_sets() -> None:
    jobs = [
        params(0),
        params(1, ("a", 1.0)),
        params(2, ("a", 1.0), ("b", 0.5)),
        params(3, ("a", 2.0)),
        params(4, ("b", 0.5), ("a", 1.0)),  # the same set as job 2, listed in another order
        params(5),
        params(6, ("a", 1.0)),
    ]
    batches = group_compatible(jobs, key=GenerationParams.batch_key, size=lambda p: p.n, max_images=8)
    assert [[p.seeds[0] for p in b] for b in batches] == [[0, 5], [1, 6], [2, 4], [3]]
    for batch in batches:
        assert len({tuple(p.adapter_scales().items()) for p in batch}) == 1


def test_adapters_apply_to_a_denoiser_compiled_before_they_were_loaded(model: ModelSpec) -> None:
    """Dynamo skips guards on module hooks by default, and an adapter is a forward hook: without the guards that
    ``compile_denoiser`` turns on, a worker that compiled at load would silently serve images without it."""
    from segquant_core.compile import compile_denoiser

    eager, compiled = TwoLayers(), TwoLayers()
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    compile_denoiser(compiled, backend="aot_eager")  # the worker compiles at load, before any adapter
    on_eager, on_compiled = DenoiserAdapters(model, "eager", 3), DenoiserAdapters(model, "compiled", 3)
    with torch.no_grad():
        assert torch.allclose(compiled(x), eager(x))
        for scales in ({"a": 1.0}, {"a": 1.0, "b": 2.0}, {}):
            on_eager.activate(eager, scales)
            on_compiled.activate(compiled, scales)
            assert torch.allclose(compiled(x), eager(x), atol=1e-5), scales
