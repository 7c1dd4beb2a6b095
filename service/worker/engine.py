"""The engine: loads model variants through ``segquant_core``'s public API and runs pipeline calls.

It knows nothing of HTTP or queues. A variant is the source pipeline in the reference precision with, for
quantized recipes, an artifact loaded into its denoiser; a missing artifact is built on first use
(calibration on the pipeline's own loop, progress in the logs) and cached under ``cache_dir``. Each loaded
variant has its own pipeline object and lock, so scheduler state is never shared between concurrent calls.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

import segquant_core as sq
from service.jobs.queue import VariantStatus
from service.registry import ModelSpec, Registry, VariantKey, VariantSpec
from service.settings import Settings
from service.worker import memory
from service.worker.sources import calibration_prompts, load_source

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class StopBatch(Exception):
    """Raised from the step callback to stop a pipeline call between two denoising steps."""

    def __init__(self, handback: bool = False) -> None:
        self.handback = handback
        super().__init__("hand back" if handback else "canceled")


@dataclass
class Sample:
    """The part of a job the pipeline sees."""

    prompt: str
    negative_prompt: str | None
    seeds: list[int]


@dataclass
class CallStats:
    """Measured during one pipeline call; the runner turns it into metrics."""

    inference_s: float = 0.0
    step_seconds: list[float] = field(default_factory=list)
    peak_memory_bytes: int = 0
    memory_kind: str = "process_rss"
    images: int = 0


@dataclass
class LoadedVariant:
    key: VariantKey
    model: ModelSpec
    spec: VariantSpec
    pipe: Any
    precision: str
    device: str
    weight_bytes: int
    load_seconds: float
    build_seconds: float | None = None
    peak_memory_bytes: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def resolve_device(setting: str) -> str:
    if setting == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was configured but CUDA is not available")
    return "cuda" if setting in ("auto", "cuda") and torch.cuda.is_available() else "cpu"


def resolve_precision(setting: str, device: str) -> torch.dtype:
    """The reference precision: bf16 (or fp16) on GPU; fp32 on CPU, where fp16 matmuls are very slow."""
    if setting != "auto":
        if setting == "float16" and device == "cpu":
            logger.warning("float16 on CPU is far slower than float32 or bfloat16")
        return _DTYPES[setting]
    if device == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def module_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


class Engine:
    """Loaded variants (LRU), artifact building, and pipeline calls with per-sample generators."""

    def __init__(self, registry: Registry, settings: Settings) -> None:
        self.registry = registry
        self.settings = settings
        self.device = resolve_device(settings.device)
        self.dtype = resolve_precision(settings.precision, self.device)
        self.precision = str(self.dtype).removeprefix("torch.")
        self._loaded: OrderedDict[VariantKey, LoadedVariant] = OrderedDict()
        self._status: dict[VariantKey, VariantStatus] = {}
        self._load_lock = threading.Lock()
        self._status_lock = threading.RLock()

    # ------------------------------------------------------------------ status
    def validate(self, keys: list[VariantKey]) -> None:
        """Fail fast on recipe names the engine does not know (a typo in the registry)."""
        for key in keys:
            spec = self.registry.model(key.model).variant(key.variant)
            try:
                sq.recipe(spec.recipe)
            except (ValueError, KeyError) as e:
                raise ValueError(f"registry variant {key}: bad recipe {spec.recipe!r}: {e}; "
                                 f"known recipes: {', '.join(sq.recipe_names())}") from None

    def artifact_dir(self, key: VariantKey) -> Path:
        return self.registry.artifact_dir(key, self.settings.cache_dir)

    def status(self, key: VariantKey) -> VariantStatus:
        with self._status_lock:
            known = self._status.get(key)
        if known is not None:
            return known.model_copy()
        spec = self.registry.model(key.model).variant(key.variant)
        built = not spec.quantized or (self.artifact_dir(key) / MANIFEST).is_file()
        return VariantStatus(state="available" if built else "not_built", recipe=spec.recipe,
                             precision=self.precision, device=self.device)

    def _set_status(self, key: VariantKey, **changes: Any) -> None:
        with self._status_lock:
            base = self._status.get(key) or self.status(key)
            self._status[key] = base.model_copy(update=changes)

    def loaded_keys(self) -> list[VariantKey]:
        return list(self._loaded)

    # ------------------------------------------------------------------ loading and building
    def load(self, key: VariantKey) -> LoadedVariant:
        """The variant, loaded (and built first if its artifact is missing); blocking."""
        with self._load_lock:
            lv = self._loaded.get(key)
            if lv is not None:
                self._loaded.move_to_end(key)
                return lv
            model = self.registry.model(key.model)
            spec = model.variant(key.variant)
            try:
                lv = self._load(key, model, spec)
            except Exception as e:
                self._set_status(key, state="failed", reason=f"{type(e).__name__}: {e}")
                logger.exception("could not load variant %s", key)
                raise
            while len(self._loaded) >= self.settings.worker.max_loaded_variants:
                self._evict()
            self._loaded[key] = lv
            self._set_status(key, state="loaded", reason=None, weight_bytes=lv.weight_bytes,
                             load_seconds=round(lv.load_seconds, 3), build_seconds=lv.build_seconds)
            return lv

    def _evict(self) -> None:
        old_key, old = self._loaded.popitem(last=False)
        with old.lock:  # never drop a pipeline mid-call
            del old.pipe
        self._set_status(old_key, state="available", reason=None)
        memory.free_memory()
        logger.info("unloaded %s to make room (max_loaded_variants=%d)", old_key,
                    self.settings.worker.max_loaded_variants)

    def _load(self, key: VariantKey, model: ModelSpec, spec: VariantSpec) -> LoadedVariant:
        start = time.perf_counter()
        build_seconds: float | None = None
        pipe = load_source(model.source, self.dtype, self.device)
        if spec.quantized:
            artifact = self.artifact_dir(key)
            with _file_lock(artifact.with_name(f".{artifact.name}.lock")):
                if (artifact / MANIFEST).is_file():
                    sq.load_into_pipeline(artifact, pipe)
                else:
                    self._set_status(key, state="building", reason=None)
                    build_start = time.perf_counter()
                    self._build(key, model, spec, pipe, artifact)
                    build_seconds = round(time.perf_counter() - build_start, 3)
        denoiser = sq.denoiser_of(pipe)
        lv = LoadedVariant(key=key, model=model, spec=spec, pipe=pipe, precision=self.precision, device=self.device,
                           weight_bytes=module_bytes(denoiser), load_seconds=time.perf_counter() - start,
                           build_seconds=build_seconds)
        logger.info("loaded %s (recipe %s, %s on %s, %d weight bytes) in %.1fs", key, spec.recipe,
                    self.precision, self.device, lv.weight_bytes, lv.load_seconds)
        return lv

    def _build(self, key: VariantKey, model: ModelSpec, spec: VariantSpec, pipe: Any, artifact: Path) -> None:
        """Calibrate ``pipe`` with the variant's recipe (quantizing it in place) and save the artifact."""
        cal = spec.calibration
        prompts = calibration_prompts(model.source, pipe, math.ceil(cal.samples / cal.steps_per_prompt),
                                      cal.prompts_file)
        logger.info("building %s: recipe %s, calibrating on %d prompts × %d of %d steps (%d samples)", key,
                    spec.recipe, len(prompts), cal.steps_per_prompt, cal.num_inference_steps, cal.samples)
        result = sq.quantize_pipeline(pipe, sq.recipe(spec.recipe), prompts,
                                      num_inference_steps=cal.num_inference_steps,
                                      steps_per_prompt=cal.steps_per_prompt, guidance_scale=cal.guidance_scale,
                                      seed=cal.seed, progress=True)
        sq.save(sq.denoiser_of(pipe), artifact, source={"model": model.name, "source": model.source,
                                                        "variant": spec.name, "precision": self.precision})
        s = result.summary()
        logger.info("built %s in %.1fs: %d layers quantized, weights %s → %s bytes; artifact %s", key,
                    s["seconds"], s["quantized_layers"], f"{s['float_bytes']:,}", f"{s['quantized_bytes']:,}",
                    artifact)

    # ------------------------------------------------------------------ generation
    def warmup(self, lv: LoadedVariant) -> None:
        """One one-step image at the default size, so the first request does not pay for lazy loading."""
        rule = lv.model.size_rule
        self.generate(lv, [Sample("warm-up", None, [0])], width=rule.default, height=rule.default, steps=1,
                      guidance_scale=lv.model.defaults.guidance_scale, on_step=lambda step, total: None)

    def denoiser_config(self, lv: LoadedVariant) -> dict[str, Any]:
        return dict(sq.denoiser_of(lv.pipe).config)

    def generate(self, lv: LoadedVariant, samples: list[Sample], *, width: int, height: int, steps: int,
                 guidance_scale: float, on_step: Callable[[int, int], None]) -> tuple[list[list[Image.Image]],
                                                                                     CallStats]:
        """One pipeline call for every image of ``samples``; images come back grouped per sample.

        ``on_step(step, total)`` runs in this thread after each denoising step and may raise
        :class:`StopBatch`. ``MemoryError`` (budget) and CUDA OOM propagate to the caller.
        """
        prompts, negatives, generators = [], [], []
        for s in samples:
            for seed in s.seeds:
                prompts.append(s.prompt)
                negatives.append(s.negative_prompt or "")
                generators.append(torch.Generator(device="cpu").manual_seed(seed))
        budget = self.settings.worker.memory_budget_bytes
        if budget is not None:
            estimate = memory.estimate_call_bytes(self.denoiser_config(lv), images=len(prompts), height=height,
                                                  width=width, guidance=guidance_scale > 1.0,
                                                  dtype_bytes=self.dtype.itemsize)
            memory.check_budget(estimate, budget)
        stats = CallStats(images=len(prompts))
        cuda = self.device == "cuda"
        stats.memory_kind = "cuda_max_allocated" if cuda else "process_rss"
        clock = [time.perf_counter()]

        def callback(pipe: Any, step_index: int, timestep: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
            now = time.perf_counter()
            stats.step_seconds.append(now - clock[0])
            clock[0] = now
            if not cuda:
                stats.peak_memory_bytes = max(stats.peak_memory_bytes, memory.rss_bytes())
            on_step(step_index + 1, int(getattr(pipe, "_num_timesteps", steps) or steps))
            return callback_kwargs

        with lv.lock:
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            clock[0] = start
            out = lv.pipe(prompt=prompts, negative_prompt=negatives if any(negatives) else None,
                          num_inference_steps=steps, guidance_scale=guidance_scale, generator=generators,
                          height=height, width=width, num_images_per_prompt=1, output_type="pil",
                          callback_on_step_end=callback)
            stats.inference_s = time.perf_counter() - start
            if cuda:
                stats.peak_memory_bytes = int(torch.cuda.max_memory_allocated())
        lv.peak_memory_bytes = max(lv.peak_memory_bytes, stats.peak_memory_bytes)
        self._set_status(lv.key, peak_memory_bytes=lv.peak_memory_bytes, memory_kind=stats.memory_kind)
        images = list(out.images)
        grouped, i = [], 0
        for s in samples:
            grouped.append(images[i:i + len(s.seeds)])
            i += len(s.seeds)
        return grouped, stats


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Serialise builds of one artifact across worker processes sharing a cache folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
