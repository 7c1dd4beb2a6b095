"""Compiled quantized denoisers: no graph breaks, and the same outputs as eager.

SegLinear layers enter the graph as opaque ``segquant::<backend>_linear`` ops, so ``fullgraph=True`` must
hold on whole diffusers denoisers. Most cases compile with the ``aot_eager`` backend (Dynamo + AOTAutograd,
the same graph Inductor gets, without generating C++): seconds instead of a minute each on two busy cores.
One test runs real Inductor on a small modulation → segmented/DualScale linears → GELU model, and checks
that recompiling after a reset is served from the on-disk FX graph cache.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from torch._dynamo.backends.registry import lookup_backend

import segquant_core as sq
from segquant_core.backends import get_backend
from segquant_core.compile import (
    compile_denoiser,
    is_compiled,
    resolve_compile,
    stable_handle,
    uncompile,
    use_cache_dir,
)
from segquant_core.seglinear import SegLinear

from .conftest import SegToy, TinyPipeline, seg_calls, seg_plan
from .test_sequential import flux_calls, sd3_calls, tiny_flux, tiny_sd3, tiny_unet, unet_calls

FAMILIES = {"sd3": (tiny_sd3, sd3_calls), "unet": (tiny_unet, unet_calls), "flux": (tiny_flux, flux_calls)}


def _quantized(family: str, spec: Any, backend: str = "auto") -> tuple[nn.Module, list[dict[str, Any]]]:
    build, make_calls = FAMILIES[family]
    model, calls = build(), make_calls(2)
    sq.quantize(model, spec, calls, backend=backend, progress=False)
    return model, calls


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out.sample


def _eager_then_compiled(
    model: nn.Module, call: dict[str, Any], ops: set[str] | None = None, fullgraph: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager output, then the output compiled with ``aot_eager``; ``ops`` collects the graph's segquant ops."""
    aot_eager = lookup_backend("aot_eager")

    def recording(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        if ops is not None:
            ops.update(str(n.target) for n in gm.graph.nodes if str(n.target).startswith("segquant."))
        return aot_eager(gm, example_inputs)

    with torch.no_grad():
        eager = _first(model(**call))
    torch._dynamo.reset()
    compile_denoiser(model, fullgraph=fullgraph, backend=recording)
    with torch.no_grad():
        compiled = _first(model(**call))
    uncompile(model)
    return eager, compiled


def _layers(model: nn.Module) -> list[SegLinear]:
    return [m for m in model.modules() if isinstance(m, SegLinear)]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_shipped_families_compile_whole_and_match_eager(family: str) -> None:
    """SD3 MMDiT, UNet and Flux quantized with w8a8-segquant: one graph, bits equal to eager."""
    model, calls = _quantized(family, "w8a8-segquant")
    layers = _layers(model)
    assert any(layer.cfg.activation.dual for layer in layers)
    assert {layer.backend.name for layer in layers} == {"cpu-onednn-int8"}
    eager, compiled = _eager_then_compiled(model, calls[0])
    assert torch.equal(compiled, eager)


@pytest.mark.parametrize(
    ("spec", "gemm_op"),
    [("w8a8-segquant", "cpu_onednn_int8_gemm"), ("w4a8-segquant", "cpu_onednn_int8_gemm_rows")],
    ids=["static", "dynamic-per-token"],
)
def test_single_group_layers_quantize_in_the_graph(spec: str, gemm_op: str) -> None:
    """At M > 32 rows a single-group layer is quantized by plain ops in the graph (static scales, or dynamic
    per-token DualScale) and only its oneDNN GEMM is opaque; small-M layers (the AdaLN modulation) and per-head
    in-segments stay whole-layer ops. Bits equal to eager either way."""
    model, calls = _quantized("sd3", spec)
    g = torch.Generator().manual_seed(9)
    big = {**calls[0], "hidden_states": torch.randn(2, 4, 16, 16, generator=g)}  # 2 × 64 tokens
    ops: set[str] = set()
    eager, compiled = _eager_then_compiled(model, big, ops)
    assert torch.equal(compiled, eager)
    assert {f"segquant.{gemm_op}.default", "segquant.cpu_onednn_int8_linear.default"} <= ops


@pytest.mark.parametrize(
    ("spec", "backend"),
    [
        ("w8a8-segquant", "int-mm"),  # static DualScale, per-head in-segments
        ("w8a8-segquant", "reference"),
        ("w4a8-segquant", "cpu-onednn-int8"),  # dynamic per-token DualScale, int4 weights
        (sq.recipe("w8a8").with_switches(dynamic=True), "cpu-onednn-int8"),  # dynamic per-tensor
    ],
    ids=["int-mm", "reference", "onednn-per-token-dynamic", "onednn-per-tensor-dynamic"],
)
def test_every_cpu_backend_and_activation_flavour_compiles(spec: Any, backend: str) -> None:
    model, calls = _quantized("sd3", spec, backend)
    layers = _layers(model)
    assert {layer.backend.name for layer in layers} == {backend}
    if spec == "w8a8-segquant":
        assert any(layer.cfg.segments.axis == "in" and len(layer.segs) > 1 for layer in layers)
    eager, compiled = _eager_then_compiled(model, calls[1])
    assert torch.equal(compiled, eager)


@pytest.mark.slow  # a recompile after the hook is added: ~1 min alone
def test_lora_side_branches_stay_in_the_graph(tmp_path: Any) -> None:
    """Adapters keep working compiled, in one graph: one loaded before compiling, and one loaded after (a new
    forward hook: not ignored, the model recompiles). The siblings' shared down projection
    (:mod:`segquant_core.lora_branch`) is traced as one stacked GEMM per sibling on the same input, which
    AOTAutograd's CSE folds into one."""
    model, calls = _quantized("sd3", "w8a8-segquant")
    g = torch.Generator().manual_seed(5)
    tensors = {}
    for name, m in model.named_modules():
        if isinstance(m, SegLinear) and name.startswith("transformer_blocks.0.attn."):
            tensors[f"{name}.lora_A.weight"] = torch.randn(4, m.in_features, generator=g)
            tensors[f"{name}.lora_B.weight"] = torch.randn(m.out_features, 4, generator=g)
    assert tensors
    save_file(tensors, str(tmp_path / "a.safetensors"))
    with torch.no_grad():
        plain = _first(model(**calls[0]))
    sq.load_lora(model, tmp_path / "a.safetensors", "a", scale=0.5)
    eager, compiled = _eager_then_compiled(model, calls[0])
    assert not torch.equal(eager, plain)  # the adapter changes the output
    assert torch.equal(compiled, eager)

    sq.unload_lora(model)
    compile_denoiser(model, backend="aot_eager")
    with torch.no_grad():
        assert torch.equal(_first(model(**calls[0])), plain)
        sq.load_lora(model, tmp_path / "a.safetensors", "a", scale=0.5)
        assert torch.equal(_first(model(**calls[0])), eager)
    uncompile(model)


@pytest.mark.slow  # the one real Inductor compile (C++ codegen): ~30 s alone, 2–3 min on the shared CI cores
def test_inductor_matches_eager_and_reuses_its_disk_cache(tmp_path: Any) -> None:
    """Real Inductor (C++ codegen) on the toy: oneDNN (M = 80) and fbgemm (M = 2, the modulation) paths,
    out-segments, ragged in-segments, DualScale. A reset then a recompile is served from the FX graph cache,
    as a restarted process would be (the handles depend only on the cache key and layer names)."""
    from torch._dynamo.utils import counters

    use_cache_dir(tmp_path / "inductor")
    model = SegToy()
    calls = seg_calls(2, batch=2, tokens=40)
    sq.quantize(model, "w8a8-segquant", calls, seg_plan(), progress=False)
    with torch.no_grad():
        eager = model(**calls[1])
    torch._dynamo.reset()
    compile_denoiser(model, fullgraph=True, cache_key="toy", example_kwargs=calls[0])
    with torch.no_grad():
        compiled = model(**calls[1])
    # the layers' own arithmetic is bit-identical; Inductor may round the fused float parts differently
    assert torch.allclose(compiled, eager, rtol=1e-5, atol=1e-5)
    assert model.proj.kernel_handle == stable_handle("toy", "proj")

    uncompile(model)
    torch._dynamo.reset()
    counters.clear()
    compile_denoiser(model, fullgraph=True, cache_key="toy", example_kwargs=calls[0])
    assert counters["inductor"]["fxgraph_cache_hit"] >= 1
    assert counters["inductor"]["fxgraph_cache_miss"] == 0
    uncompile(model)


def test_compile_switch() -> None:
    assert resolve_compile("on", default=False) and resolve_compile(True, default=False)
    assert not resolve_compile("off", default=True)
    assert resolve_compile("auto", default=True) and not resolve_compile("auto", default=False)
    with pytest.raises(ValueError, match="compile must be one of auto, on, off"):
        resolve_compile("yes", default=False)

    for setting, expected in (("off", False), ("on", True)):
        pipe = TinyPipeline()
        sq.quantize_pipeline(
            pipe,
            "w8a8",
            ["a", "bb"],
            num_inference_steps=2,
            steps_per_prompt=1,
            plan=seg_plan(seg=False, dual=False),
            progress=False,
            compile=setting,
        )
        assert is_compiled(pipe.transformer) is expected
        assert all(layer.backend.name == "cpu-onednn-int8" for layer in _layers(pipe.transformer))


def test_every_layer_has_its_own_handle() -> None:
    models = [SegToy(), SegToy()]
    for model in models:
        sq.quantize(model, "w8a8", seg_calls(1), seg_plan(seg=False, dual=False), progress=False)
    handles = [layer.kernel_handle for model in models for layer in _layers(model)]
    assert len(set(handles)) == len(handles) == 10
    before = models[0].ff.kernel_handle
    models[0].ff.set_backend(get_backend("int-mm"))
    assert models[0].ff.kernel_handle != before  # every set_backend binds afresh
