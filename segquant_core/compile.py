"""``torch.compile`` for a whole denoiser, quantized or float, and where Inductor keeps what it compiled.

SegLinear layers enter the graph as one opaque custom op each (:mod:`segquant_core.backends.ops`), so the
denoiser traces without graph breaks and Inductor fuses everything between the GEMMs (norms, modulation,
attention's surroundings, GELU/SiLU, LoRA side branches). Compiled outputs equal eager ones: the quantized
GEMMs run the same kernels, and the float parts differ at most by rounding.

Compilation happens on the first call of each new input shape (automatic dynamic shapes: a second batch
size recompiles once with a symbolic batch, then no more); :func:`compile_denoiser` can pay it up front on
example inputs and report the seconds. :func:`use_cache_dir` points Inductor's on-disk caches (FX graph
cache, AOTAutograd cache, generated C++) at a folder so that another process compiling the same model hits
them. A handle per layer is baked into the graph as a constant; ``cache_key`` makes the handles a
function of the model's identity and layer names, so a restarted process produces the same graph.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from segquant_core.backends.ops import bind
from segquant_core.seglinear import SegLinear

logger = logging.getLogger(__name__)

CompileSetting = Literal["auto", "on", "off"]
COMPILE_SETTINGS: tuple[str, ...] = ("auto", "on", "off")


@dataclass(frozen=True)
class CompileResult:
    """What :func:`compile_denoiser` did: whether the model is compiled, and the warm-up compile time."""

    compiled: bool
    seconds: float | None = None  # first call on the example inputs (compile + one run); None without examples


# What ``auto`` means per device (docs/benchmarks.md, "Issue 15: one quiet run", `compile: auto`). CPU: compiled
# was faster in 15 of 16 measured pairs, but the compiled quantized variants still trail compiled fp on the
# shipped model and a cold worker pays 20-60 s per variant, so ``auto`` stays off; ``on`` opts in. CUDA: not
# measured at all (no GPU was available). Inductor on CPU also needs a C++ compiler.
COMPILE_FASTER = {"cpu": False, "cuda": False}


def compile_default(device: str) -> bool:
    """Whether ``auto`` compiles on ``device`` (``cpu``, ``cuda``): measured faster there and compilable."""
    if not COMPILE_FASTER.get(device, False):
        return False
    return device != "cpu" or any(shutil.which(c) for c in (os.environ.get("CXX", "c++"), "g++", "clang++"))


def resolve_compile(setting: str | bool | None, *, default: bool) -> bool:
    """``on``/``off``/``auto`` (or a bool) → whether to compile; ``auto`` takes ``default`` (what was measured
    faster for this model and variant)."""
    if isinstance(setting, bool):
        return setting
    if setting is None or setting == "auto":
        return default
    if setting == "on":
        return True
    if setting == "off":
        return False
    raise ValueError(f"compile must be one of {', '.join(COMPILE_SETTINGS)} (or a bool), got {setting!r}")


def use_cache_dir(folder: str | Path) -> Path:
    """Keep Inductor's on-disk caches under ``folder`` (FX graph and AOTAutograd caches on).

    Inductor reads ``TORCHINDUCTOR_CACHE_DIR`` whenever it looks for a cache entry, so this may be called
    before or after torch is imported, but before the first compilation of interest.
    """
    path = Path(folder).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = True
    if hasattr(inductor_config, "autograd_cache"):
        inductor_config.autograd_cache = True  # type: ignore[attr-defined]
    return path


def stable_handle(cache_key: str, layer_name: str) -> int:
    """A 62-bit handle that depends only on ``cache_key`` and the layer's name (same in every process)."""
    digest = hashlib.sha256(f"{cache_key}\0{layer_name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 2


def bind_layers(model: nn.Module, cache_key: str | None = None) -> int:
    """(Re-)bind every SegLinear of ``model`` to a handle its op finds it by; returns how many."""
    n = 0
    for name, module in model.named_modules():
        if isinstance(module, SegLinear) and module._backend is not None:
            bind(module, stable_handle(cache_key, name) if cache_key is not None else None)
            n += 1
    return n


def is_compiled(model: nn.Module) -> bool:
    return getattr(model, "_compiled_call_impl", None) is not None


def compile_denoiser(
    model: nn.Module,
    *,
    example_kwargs: Mapping[str, Any] | None = None,
    cache_key: str | None = None,
    fullgraph: bool = False,
    dynamic: bool | None = None,
    mode: str | None = None,
    backend: str | Callable[..., Any] = "inductor",
) -> CompileResult:
    """Compile ``model`` in place (``nn.Module.compile``: pipelines keep calling the same module).

    ``example_kwargs``: one forward is run on them under ``no_grad`` to compile now; its seconds are
    returned. ``cache_key``: a name for this model (e.g. the service's ``model/variant``) that makes the
    graph, and so Inductor's cache entries, the same in every process. ``fullgraph=True`` turns any graph
    break into an error (the tests use it); serving leaves it off so that an unexpected break in a
    third-party model costs speed, not the request. ``backend``: Dynamo's backend (``aot_eager`` traces the
    same graph without generating code; the tests use it).
    """
    n = bind_layers(model, cache_key)
    # Dynamo skips guards on module hooks by default: an adapter loaded after compiling (a LoRA side branch is a
    # forward hook) would be silently ignored. With the guards it recompiles instead (correct, and slow).
    torch._dynamo.config.skip_nnmodule_hook_guards = False
    model.compile(fullgraph=fullgraph, dynamic=dynamic, mode=mode, backend=backend)
    logger.info("compiling %s (%d quantized layers as segquant ops)", type(model).__name__, n)
    if example_kwargs is None:
        return CompileResult(True)
    start = time.perf_counter()
    with torch.no_grad():
        model(**example_kwargs)
    seconds = time.perf_counter() - start
    logger.info("compiled %s in %.1fs", type(model).__name__, seconds)
    return CompileResult(True, seconds)


def uncompile(model: nn.Module) -> None:
    """Back to eager: drop the compiled call (the compiled code stays in Inductor's caches)."""
    if is_compiled(model):
        model._compiled_call_impl = None  # type: ignore[assignment]
