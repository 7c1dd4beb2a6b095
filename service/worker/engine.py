"""The engine: loads model variants through ``segquant_core``'s public API, builds artifacts, runs calls.

It knows nothing of HTTP or queues. A model's non-denoiser components (text encoders, tokenizers, VAE) are
loaded once per worker (:class:`~service.worker.pipeline_parts.SharedParts`); each loaded variant holds only
its own denoiser (the float one, or one with an artifact loaded into it) and every call wraps it in a light
pipeline with a scheduler of its own. Loading never builds: a missing artifact is built by :meth:`Engine.build`,
which the runner runs in a background thread while the other variants keep serving, then scored against
``fp`` (``eval.json`` next to the artifact).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import inspect
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
from service.worker.adapters import DenoiserAdapters
from service.worker.build_progress import BuildCanceled, BuildTracker
from service.worker.fidelity import eval_prompts, evaluate_artifact
from service.worker.pipeline_parts import SharedParts, tensor_bytes
from service.worker.sources import calibration_prompts

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class StopBatch(Exception):
    """Raised from the step callback to stop a pipeline call between two denoising steps."""

    def __init__(self, handback: bool = False, stalled: bool = False) -> None:
        self.handback, self.stalled = handback, stalled
        super().__init__("hand back" if handback else "stalled" if stalled else "canceled")


class ArtifactMissingError(RuntimeError):
    """A quantized variant was asked for before its artifact was built (the runner starts a build)."""


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
    adapters_loaded: list[str] = field(default_factory=list)  # adapters this call had to load first


@dataclass
class LoadedVariant:
    """A variant in memory: its own denoiser plus a reference to its model's shared parts."""

    key: VariantKey
    model: ModelSpec
    spec: VariantSpec
    denoiser: torch.nn.Module
    parts: SharedParts
    precision: str
    device: str
    weight_bytes: int
    load_seconds: float
    adapters: DenoiserAdapters
    compile_s: float | None = None  # torch.compile warm-up at load; None: runs eagerly
    build_seconds: float | None = None
    peak_memory_bytes: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def pipeline(self) -> Any:
        """A light pipeline for one call: this denoiser, the shared parts, a fresh scheduler."""
        return self.parts.pipeline(self.denoiser)


@dataclass
class BuildOutcome:
    """What one :meth:`Engine.build` did: built here or found built by another worker, and its fidelity."""

    built_here: bool
    seconds: float
    fidelity: dict[str, Any] | None = None


def resolve_device(setting: str) -> str:
    if setting == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was configured but CUDA is not available")
    return "cuda" if setting in ("auto", "cuda") and torch.cuda.is_available() else "cpu"


def cpu_has_fast_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 matmuls run natively (about twice fp32); elsewhere they are emulated."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def resolve_precision(setting: str, device: str) -> torch.dtype:
    """The reference precision: bf16 (or fp16) on GPU; on CPU bf16 where it is native (AVX512-BF16, AMX),
    else fp32 (fp16 matmuls are very slow on CPUs)."""
    if setting != "auto":
        if setting == "float16" and device == "cpu":
            logger.warning("float16 on CPU is far slower than float32 or bfloat16")
        return _DTYPES[setting]
    if device == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


def module_bytes(module: torch.nn.Module) -> int:
    return tensor_bytes(module)


def build_route(key: VariantKey) -> str:
    return f"POST /models/{key.model}/variants/{key.variant}/build"


class Engine:
    """Loaded variants (LRU, evicted before a load would exceed the limits), shared parts, builds, calls."""

    def __init__(self, registry: Registry, settings: Settings) -> None:
        self.registry = registry
        self.settings = settings
        self.device = resolve_device(settings.device)
        self.dtype = resolve_precision(settings.precision, self.device)
        self.precision = str(self.dtype).removeprefix("torch.")
        sq.use_cache_dir(settings.cache_dir / "inductor")  # compiled kernels survive a worker restart
        self._loaded: OrderedDict[VariantKey, LoadedVariant] = OrderedDict()
        self._status: dict[VariantKey, VariantStatus] = {}
        self._checked: dict[VariantKey, tuple[int, bool]] = {}  # manifest mtime -> current (staleness check)
        self._load_lock = threading.Lock()
        self._status_lock = threading.RLock()
        self._parts_lock = threading.Lock()
        self._parts: dict[str, SharedParts] = {}
        self._spare: dict[str, torch.nn.Module] = {}  # the float denoiser that came with a parts load, unused yet
        self._parts_users: dict[str, int] = {}  # builds (and loads in progress) holding a model's parts
        self._builds: dict[VariantKey, BuildTracker] = {}
        self._build_errors: dict[VariantKey, str] = {}

    # ------------------------------------------------------------------ status
    def validate(self, keys: list[VariantKey]) -> None:
        """Fail fast on recipe names the engine does not know (a typo in the registry)."""
        for key in keys:
            spec = self.registry.model(key.model).variant(key.variant)
            try:
                sq.recipe(spec.recipe)
            except (ValueError, KeyError) as e:
                raise ValueError(
                    f"registry variant {key}: bad recipe {spec.recipe!r}: {e}; "
                    f"known recipes: {', '.join(sq.recipe_names())}"
                ) from None

    def artifact_dir(self, key: VariantKey) -> Path:
        return self.registry.artifact_dir(key, self.settings.cache_dir)

    def is_built(self, key: VariantKey) -> bool:
        """fp, or a quantized variant whose checkpoint is what this engine would build (a stale one — other
        engine numerics, recipe or format — is rebuilt rather than served)."""
        spec = self.registry.model(key.model).variant(key.variant)
        return not spec.quantized or self._artifact_current(key, spec)

    def _artifact_current(self, key: VariantKey, spec: VariantSpec) -> bool:
        """Read the manifest only when it changed (status and advertisements ask on every heartbeat)."""
        artifact = self.artifact_dir(key)
        try:
            stamp = (artifact / MANIFEST).stat().st_mtime_ns
        except FileNotFoundError:
            return False
        cached = self._checked.get(key)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        status = sq.checkpoint_status(artifact, spec.recipe)
        if not status:
            logger.warning("artifact of %s at %s is stale (%s); it will be rebuilt", key, artifact, status.reason)
        self._checked[key] = (stamp, status.current)
        return status.current

    def status(self, key: VariantKey) -> VariantStatus:
        with self._status_lock:
            known = self._status.get(key)
            tracker = self._builds.get(key)
        if known is None or (known.state == "not_built" and self.is_built(key)):
            spec = self.registry.model(key.model).variant(key.variant)
            known = VariantStatus(
                state="available" if self.is_built(key) else "not_built",
                recipe=spec.recipe,
                precision=self.precision,
                device=self.device,
            )
        out = known.model_copy()
        if tracker is not None:
            out.state, out.progress = "building", tracker.snapshot()
        parts = self._parts.get(key.model)
        out.shared_bytes = parts.shared_bytes if parts is not None else out.shared_bytes
        return out

    def _set_status(self, key: VariantKey, **changes: Any) -> None:
        with self._status_lock:
            base = self._status.get(key) or self.status(key)
            self._status[key] = base.model_copy(update=changes)

    def loaded_keys(self) -> list[VariantKey]:
        return list(self._loaded)

    def building(self, key: VariantKey) -> bool:
        return key in self._builds

    def build_error(self, key: VariantKey) -> str | None:
        """Why the last build of ``key`` on this worker failed (None: it did not, or a new one was asked for)."""
        return self._build_errors.get(key)

    def shared_bytes(self, model: str) -> int | None:
        parts = self._parts.get(model)
        return parts.shared_bytes if parts is not None else None

    def shared_parts(self, model: str) -> SharedParts | None:
        return self._parts.get(model)

    # ------------------------------------------------------------------ shared parts
    def _acquire_parts(self, model: ModelSpec) -> SharedParts:
        """The model's shared parts (loaded on first use), held until :meth:`_release_parts`."""
        with self._parts_lock:
            self._parts_users[model.name] = self._parts_users.get(model.name, 0) + 1
            parts = self._parts.get(model.name)
            if parts is None:
                parts, denoiser = SharedParts.load(
                    model.source, self.dtype, self.device, getattr(model, "drop_components", ())
                )
                self._parts[model.name], self._spare[model.name] = parts, denoiser
                logger.info(
                    "loaded the shared parts of %s (%s bytes: %s)",
                    model.name,
                    f"{parts.shared_bytes:,}",
                    ", ".join(k for k, v in parts.components.items() if isinstance(v, torch.nn.Module)) or "no modules",
                )
            return parts

    def _release_parts(self, model: str) -> None:
        """Drop a model's shared parts once no loaded variant and no build uses them."""
        with self._parts_lock:
            self._parts_users[model] = max(0, self._parts_users.get(model, 0) - 1)
            if self._parts_users[model] == 0 and not any(k.model == model for k in self._loaded):
                self._parts.pop(model, None)
                self._spare.pop(model, None)
                logger.info("released the shared parts of %s (no variant of it is loaded)", model)

    def _float_denoiser(self, model: ModelSpec, parts: SharedParts) -> torch.nn.Module:
        with self._parts_lock:
            spare = self._spare.pop(model.name, None)
        return spare if spare is not None else parts.float_denoiser()

    # ------------------------------------------------------------------ loading
    def load(self, key: VariantKey) -> LoadedVariant:
        """The variant, loaded (evicting others first when it would not fit); blocking; never builds."""
        with self._load_lock:
            lv = self._loaded.get(key)
            if lv is not None:
                self._loaded.move_to_end(key)
                return lv
            model = self.registry.model(key.model)
            spec = model.variant(key.variant)
            if not self.is_built(key):
                raise ArtifactMissingError(
                    f"variant {key} has no artifact yet ({self.artifact_dir(key)}); "
                    f"it is built in the background ({build_route(key)})"
                )
            self._make_room(key, self._expected_bytes(key, spec))
            try:
                lv = self._load(key, model, spec)
            except Exception as e:
                self._set_status(key, state="failed", reason=f"{type(e).__name__}: {e}")
                logger.exception("could not load variant %s", key)
                raise
            self._loaded[key] = lv
            self._release_parts(key.model)  # the loaded variant now keeps the parts alive
            self._set_status(
                key,
                state="loaded",
                reason=None,
                weight_bytes=lv.weight_bytes,
                load_seconds=round(lv.load_seconds, 3),
                compile_s=lv.compile_s,
            )
            return lv

    def _expected_bytes(self, key: VariantKey, spec: VariantSpec) -> int:
        """What loading ``key`` will add: its last measured weight bytes, else its files on disk."""
        with self._status_lock:
            known = self._status.get(key)
        if known is not None and known.weight_bytes:
            return known.weight_bytes
        if spec.quantized:
            return sum(f.stat().st_size for f in self.artifact_dir(key).glob("*.safetensors"))
        fp = [lv.weight_bytes for k, lv in self._loaded.items() if k.model == key.model and not lv.spec.quantized]
        return fp[0] if fp else 0

    def _resident_bytes(self) -> int:
        return sum(lv.weight_bytes for lv in self._loaded.values()) + sum(p.shared_bytes for p in self._parts.values())

    def _make_room(self, key: VariantKey, expected: int) -> None:
        """Evict least recently used variants *before* loading ``key``, so the peak never holds one too many."""
        limit = self.settings.worker.max_loaded_variants
        budget = self.settings.worker.memory_budget_bytes
        while self._loaded:
            if len(self._loaded) >= limit:
                why = f"max_loaded_variants={limit}"
            elif budget is not None and self._resident_bytes() + expected > budget:
                why = f"memory budget: {self._resident_bytes():,} resident + {expected:,} expected > {budget:,} bytes"
            else:
                return
            self._evict(before=key, why=why)
        if budget is not None and self._resident_bytes() + expected > budget:
            logger.warning(
                "%s needs about %s bytes, more than the memory budget of %s; loading it anyway",
                key,
                f"{expected:,}",
                f"{budget:,}",
            )

    def _evict(self, *, before: VariantKey, why: str) -> None:
        old_key, old = self._loaded.popitem(last=False)
        with old.lock:  # never drop a denoiser mid-call
            del old.denoiser
        self._set_status(old_key, state="available", reason=None)
        logger.info("unloaded %s before loading %s (%s)", old_key, before, why)
        with self._parts_lock:
            if not self._parts_users.get(old_key.model) and not any(k.model == old_key.model for k in self._loaded):
                self._parts.pop(old_key.model, None)
                self._spare.pop(old_key.model, None)
        memory.free_memory()

    def _lock_path(self, artifact: Path) -> Path:
        """The build/load lock of ``artifact``, under the cache folder: an ``artifact:`` folder may be read-only
        (a shipped checkpoint inside an installed package), and workers that share a cache share its locks."""
        digest = hashlib.sha256(str(artifact.expanduser().resolve()).encode()).hexdigest()[:16]
        return self.settings.cache_dir.expanduser() / "locks" / f"{artifact.name}-{digest}.lock"

    def _load(self, key: VariantKey, model: ModelSpec, spec: VariantSpec) -> LoadedVariant:
        start = time.perf_counter()
        logger.info("loading %s (recipe %s)", key, spec.recipe)
        parts = self._acquire_parts(model)
        try:
            if spec.quantized:
                artifact = self.artifact_dir(key)
                with _file_lock(self._lock_path(artifact)):
                    # a self-contained checkpoint loads without the float denoiser (format 2)
                    denoiser = sq.load_denoiser(artifact, device=self.device, dtype=self.dtype)
                with self._parts_lock:  # a float denoiser that came with the parts is not kept for it
                    self._spare.pop(model.name, None)
            else:
                denoiser = self._float_denoiser(model, parts)
        except BaseException:
            self._release_parts(model.name)
            raise
        lv = LoadedVariant(
            key=key,
            model=model,
            spec=spec,
            denoiser=denoiser,
            parts=parts,
            precision=self.precision,
            device=self.device,
            weight_bytes=sq.resident_bytes(denoiser),  # kernels included, each weight once
            load_seconds=time.perf_counter() - start,
            adapters=DenoiserAdapters(model, str(key), self.settings.worker.adapter_cache_size),
        )
        logger.info(
            "loaded %s (recipe %s, %s on %s, %s denoiser bytes, %s shared) in %.1fs",
            key,
            spec.recipe,
            self.precision,
            self.device,
            f"{lv.weight_bytes:,}",
            f"{parts.shared_bytes:,}",
            lv.load_seconds,
        )
        if sq.resolve_compile(spec.compile, default=sq.compile_default(self.device)):
            lv.compile_s = self._compile(lv)
        return lv

    def _compile(self, lv: LoadedVariant) -> float:
        """Compile the denoiser and pay for it now: warm-ups of one and two images (the second batch size makes
        the batch dimension dynamic, so later batch sizes do not compile again). Inductor's cache lives under
        the cache folder, so a restarted worker mostly reads it back."""
        start = time.perf_counter()
        sq.compile_denoiser(lv.denoiser, cache_key=str(lv.key))
        rule = lv.model.size_rule
        for images in (1, 2):
            self.generate(
                lv,
                [Sample("warm-up", None, list(range(images)))],
                width=rule.default,
                height=rule.default,
                steps=1,
                guidance_scale=lv.model.defaults.guidance_scale,
                on_step=lambda step, total: None,
            )
        seconds = round(time.perf_counter() - start, 1)
        logger.info("compiled %s (torch.compile, %s) in %.1fs", lv.key, self.precision, seconds)
        return seconds

    # ------------------------------------------------------------------ building (background thread)
    def build(self, key: VariantKey, tracker: BuildTracker) -> BuildOutcome:
        """Build ``key``'s artifact unless another worker did (file lock), then record its fidelity. Blocking.

        Runs in a thread of its own: the worker keeps serving its other variants meanwhile. A failure is kept
        (:meth:`build_error`) so that waiting jobs fail with its reason instead of starting it again.
        """
        model = self.registry.model(key.model)
        spec = model.variant(key.variant)
        artifact = self.artifact_dir(key)
        start = time.perf_counter()
        with self._status_lock:
            self._build_errors.pop(key, None)
            self._builds[key] = tracker
        built_here, fidelity = False, None
        try:
            tracker.phase("waiting for the build lock")
            with _file_lock(self._lock_path(artifact)):
                calibration: list[str] | None = None
                if not self._artifact_current(key, spec):
                    calibration = self._calibrate_and_save(key, model, spec, artifact, tracker)
                    built_here = True
                else:
                    logger.info("%s was built by another worker meanwhile; not building it again", key)
                report = self.registry.eval_report_path(key, self.settings.cache_dir)
                if model.eval.prompts > 0 and not report.is_file():
                    fidelity = self._evaluate(key, model, spec, artifact, report, tracker, calibration)
        except BuildCanceled:
            logger.warning("build of %s canceled (worker stopping); a later request starts it again", key)
            with self._status_lock:
                self._status.pop(key, None)
            raise
        except Exception as e:
            message = f"build failed: {type(e).__name__}: {e}"
            logger.exception("build of %s failed", key)
            with self._status_lock:
                self._build_errors[key] = message
            self._set_status(key, state="failed", reason=message)
            raise
        finally:
            with self._status_lock:
                self._builds.pop(key, None)
            memory.free_memory()
        seconds = round(time.perf_counter() - start, 3)
        self._set_status(
            key,
            state="loaded" if key in self._loaded else "available",
            reason=None,
            build_seconds=seconds if built_here else None,
        )
        return BuildOutcome(built_here=built_here, seconds=seconds, fidelity=fidelity)

    def _calibrate_and_save(
        self, key: VariantKey, model: ModelSpec, spec: VariantSpec, artifact: Path, tracker: BuildTracker
    ) -> list[str]:
        """Calibrate a fresh float denoiser (around the shared parts) with the recipe; write the artifact.

        Returns the calibration prompts (the evaluation must not use them)."""
        cal = spec.calibration
        cal_steps = cal.num_inference_steps or model.defaults.num_inference_steps
        n_prompts = math.ceil(cal.samples / cal.steps_per_prompt)
        eval_calls = 2 * model.eval.prompts * (model.eval.num_inference_steps or model.defaults.num_inference_steps)
        tracker.plan(calibrating=n_prompts * cal_steps + cal.samples, evaluating=eval_calls)
        tracker.phase("loading")
        parts = self._acquire_parts(model)
        try:
            denoiser = self._float_denoiser(model, parts)
            pipe = parts.pipeline(denoiser)
            prompts = calibration_prompts(model.source, pipe, n_prompts, cal.prompts_file)
            logger.info(
                "building %s: recipe %s, calibrating on %d prompts × %d of %d steps (%d samples)",
                key,
                spec.recipe,
                len(prompts),
                cal.steps_per_prompt,
                cal_steps,
                cal.samples,
            )
            tracker.phase("calibrating")
            # Until the engine's calibration reports progress itself, denoiser calls are the progress.
            hook = tracker.watch(denoiser)
            try:
                result = sq.quantize_pipeline(
                    pipe,
                    sq.recipe(spec.recipe),
                    prompts,
                    num_inference_steps=cal_steps,
                    steps_per_prompt=cal.steps_per_prompt,
                    guidance_scale=cal.guidance_scale,
                    seed=cal.seed,
                    progress=False,
                    call_kwargs=getattr(cal, "call_kwargs", None),
                )
            finally:
                hook.remove()
            tracker.phase("saving")
            sq.save(
                denoiser,
                artifact,
                source={"model": model.name, "source": model.source, "variant": spec.name, "precision": self.precision},
            )
            del pipe, denoiser
        finally:
            self._release_parts(model.name)
        s = result.summary()
        logger.info(
            "built %s in %.1fs: %d layers quantized, weights %s → %s bytes; artifact %s",
            key,
            s["seconds"],
            s["quantized_layers"],
            f"{s['float_bytes']:,}",
            f"{s['quantized_bytes']:,}",
            artifact,
        )
        return prompts

    def _evaluate(
        self,
        key: VariantKey,
        model: ModelSpec,
        spec: VariantSpec,
        artifact: Path,
        report: Path,
        tracker: BuildTracker,
        calibration: list[str] | None,
    ) -> dict[str, Any] | None:
        """Score the fresh artifact against fp (model's ``eval`` section); a failure here never fails the build.

        ``calibration``: the prompts the build calibrated on (None: built elsewhere, derived again)."""
        ev = model.eval
        steps = ev.num_inference_steps or model.defaults.num_inference_steps
        parts = self._acquire_parts(model)
        hooks: list[Any] = []

        def load_float_pipeline() -> Any:
            if pending:
                return pending.pop()
            denoiser = parts.float_denoiser()
            hooks.append(tracker.watch(denoiser))
            return parts.pipeline(denoiser)

        try:
            first = self._float_denoiser(model, parts)
            hooks.append(tracker.watch(first))
            probe = parts.pipeline(first)  # evaluate()'s fp pipeline; also asked for prompts and a scorer
            pending = [probe]
            prompts = eval_prompts(probe, ev.prompts, ev.prompts_file)
            cal = spec.calibration
            if calibration is None:
                count = math.ceil(cal.samples / cal.steps_per_prompt)
                calibration = calibration_prompts(model.source, probe, count, cal.prompts_file)
            tracker.phase("evaluating", total=2 * len(prompts) * len(ev.seeds) * steps)
            rule = model.size_rule
            data = evaluate_artifact(
                load_float_pipeline,
                artifact,
                spec.recipe,
                prompts=prompts,
                calibration_prompts=calibration,
                seeds=ev.seeds,
                num_inference_steps=steps,
                guidance_scale=model.defaults.guidance_scale,
                scorer=getattr(probe, "adherence_scorer", None),
                call_kwargs={"height": rule.default, "width": rule.default},
                out=report,
            )
            entry = next(iter(data["variants"]), {})
            logger.info(
                "fidelity of %s against fp on %d prompts × %d seeds at %d steps: PSNR %s dB, SSIM %s; %s",
                key,
                len(prompts),
                len(ev.seeds),
                steps,
                entry.get("psnr"),
                entry.get("ssim"),
                report,
            )
            return data
        except BuildCanceled:
            raise
        except Exception as e:
            logger.warning(
                "could not evaluate %s after building it (%s: %s); it is served without fidelity figures",
                key,
                type(e).__name__,
                e,
            )
            return None
        finally:
            for h in hooks:
                h.remove()
            self._release_parts(model.name)

    # ------------------------------------------------------------------ generation
    def warmup(self, lv: LoadedVariant) -> None:
        """One one-step image at the default size, so the first request does not pay for lazy loading."""
        rule = lv.model.size_rule
        self.generate(
            lv,
            [Sample("warm-up", None, [0])],
            width=rule.default,
            height=rule.default,
            steps=1,
            guidance_scale=lv.model.defaults.guidance_scale,
            on_step=lambda step, total: None,
        )

    def denoiser_config(self, lv: LoadedVariant) -> dict[str, Any]:
        return dict(lv.denoiser.config)

    def estimate_call_bytes(self, lv: LoadedVariant, *, images: int, height: int, width: int, guidance: bool) -> int:
        """The activation estimate of one call, in latent space for latent models (VAE scale, packing)."""
        vae = lv.parts.components.get("vae")
        scale = None
        if vae is not None:
            channels = getattr(vae.config, "block_out_channels", None) or [0]
            scale = 2 ** (len(channels) - 1)
        packing = 2 if "Flux" in lv.parts.pipeline_class.__name__ else 1  # 2×2 latents per token
        return memory.estimate_call_bytes(
            self.denoiser_config(lv),
            images=images,
            height=height,
            width=width,
            guidance=guidance,
            dtype_bytes=self.dtype.itemsize,
            pixel_space=vae is None,
            vae_scale_factor=scale,
            latent_packing=packing,
        )

    def generate(
        self,
        lv: LoadedVariant,
        samples: list[Sample],
        *,
        width: int,
        height: int,
        steps: int,
        guidance_scale: float,
        on_step: Callable[[int, int], None],
        adapters: dict[str, float] | None = None,
    ) -> tuple[list[list[Image.Image]], CallStats]:
        """One pipeline call for every image of ``samples``; images come back grouped per sample.

        ``adapters`` (name → scale) are exactly the LoRA adapters active in this call (none by default).
        ``on_step(step, total)`` runs in this thread after each denoising step and may raise
        :class:`StopBatch`. ``MemoryError`` (budget) and CUDA OOM propagate to the caller, and
        :class:`~service.worker.adapters.AdapterLoadError` when an adapter cannot be loaded.
        """
        prompts, negatives, generators = [], [], []
        for s in samples:
            for seed in s.seeds:
                prompts.append(s.prompt)
                negatives.append(s.negative_prompt or "")
                generators.append(torch.Generator(device="cpu").manual_seed(seed))
        budget = self.settings.worker.memory_budget_bytes
        if budget is not None:
            estimate = self.estimate_call_bytes(
                lv, images=len(prompts), height=height, width=width, guidance=guidance_scale > 1.0
            )
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

        pipe = lv.pipeline()
        extra: dict[str, Any] = {}
        if "use_resolution_binning" in inspect.signature(type(pipe).__call__).parameters:
            extra["use_resolution_binning"] = False  # PixArt: render the asked size, never a silent resize
        with lv.lock:
            stats.adapters_loaded = lv.adapters.activate(lv.denoiser, adapters or {})
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            clock[0] = start
            out = pipe(
                prompt=prompts,
                negative_prompt=negatives if any(negatives) else None,
                num_inference_steps=steps,
                guidance_scale=guidance_scale,
                generator=generators,
                height=height,
                width=width,
                num_images_per_prompt=1,
                output_type="pil",
                callback_on_step_end=callback,
                **extra,
            )
            stats.inference_s = time.perf_counter() - start
            if cuda:
                stats.peak_memory_bytes = int(torch.cuda.max_memory_allocated())
        lv.peak_memory_bytes = max(lv.peak_memory_bytes, stats.peak_memory_bytes)
        self._set_status(lv.key, peak_memory_bytes=lv.peak_memory_bytes, memory_kind=stats.memory_kind)
        images = list(out.images)
        grouped, i = [], 0
        for s in samples:
            grouped.append(images[i : i + len(s.seeds)])
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
