"""The model registry: which models the service offers, their variants (recipes) and where artifacts live.

A registry file (YAML, TOML or JSON; or ``models:`` inline in the settings file) lists models::

    models:
      - name: shapes-mmdit
        source: shipped:mmdit            # shipped:NAME | tiny:KIND[:SEED] | /path/to/pipeline | hub/id
        variants: [fp, w8a8-segquant]    # short form: variant name = recipe name
      - name: other
        source: /models/other
        sizes: {multiple_of: 16, min: 256, max: 1024, default: 512}
        variants:
          - {name: int8, recipe: "w8a8-segquant:dual=off", calibration: {samples: 32}}

A variant's artifact defaults to ``<cache_dir>/<model>/<variant>/`` and its fidelity report to ``eval.json``
inside that folder. This module is torch-free: the API validates sizes from it without loading a model.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from service.adapter_specs import ADAPTER_CARD_FILE, NAME_PATTERN, AdapterSpec
from service.pipeline_folder import active_components, expand_drop
from service.preset_sizes import preset_size_config

EVAL_REPORT_FILE = "eval.json"
# The embedded default (no registry configured): (model, shipped pipeline, description); the first is the default.
DEFAULT_SHIPPED_MODELS = (
    ("shapes-mmdit", "mmdit", "the project's own 32x32 pixel-space MMDiT, SD3-style (coloured shapes)"),
    ("shapes-flux", "flux", "the project's own 32x32 pixel-space Flux-style DiT: double- and single-stream blocks"),
    ("shapes-unet", "unet", "the project's own 32x32 pixel-space UNet with cross-attention and GEGLU"),
)
DEFAULT_RECIPES = ("w8a8-segquant", "w4a8-segquant")


class UnknownModelError(LookupError):
    """A model or variant name that the registry does not list; carries the valid names."""

    def __init__(self, what: str, name: str, valid: list[str], model: str | None = None) -> None:
        self.what, self.name, self.valid = what, name, valid
        of = f" of model {model!r}" if model else ""
        super().__init__(f"unknown {what} {name!r}{of}; valid: {', '.join(valid) or '(none)'}")


class SizeRule(BaseModel):
    """Allowed image sizes of a model: a multiple and bounds, for width and height alike."""

    model_config = ConfigDict(extra="forbid")
    multiple_of: int = Field(8, ge=1)
    min: int = Field(8, ge=1)
    max: int = Field(2048, ge=1)
    default: int = Field(512, ge=1)

    @model_validator(mode="after")
    def _consistent(self) -> SizeRule:
        if not self.min <= self.default <= self.max:
            raise ValueError(f"sizes: need min <= default <= max, got {self.min}, {self.default}, {self.max}")
        if self.default % self.multiple_of:
            raise ValueError(f"sizes: default {self.default} is not a multiple of {self.multiple_of}")
        return self

    def problem(self, value: int) -> str | None:
        """Why ``value`` is not an allowed size, or None."""
        if value % self.multiple_of:
            return f"must be a multiple of {self.multiple_of} (got {value})"
        if not self.min <= value <= self.max:
            return f"must be between {self.min} and {self.max} (got {value})"
        return None


class CalibrationSpec(BaseModel):
    """How a missing artifact is built: denoiser calls recorded from the pipeline's own loop."""

    model_config = ConfigDict(extra="forbid")
    samples: int = Field(256, ge=1, description="recorded denoiser calls (per-segment static scales need coverage)")
    num_inference_steps: int | None = Field(None, ge=1, description="default: the model's defaults")
    steps_per_prompt: int = Field(4, ge=1)
    guidance_scale: float | None = Field(None, description="default: the model's defaults.guidance_scale")
    height: int | None = Field(None, ge=1, description="default: the model's default size")
    width: int | None = Field(None, ge=1, description="default: the model's default size")
    seed: int = 0
    prompts_file: Path | None = None

    @model_validator(mode="after")
    def _steps(self) -> CalibrationSpec:
        if self.num_inference_steps is not None and self.steps_per_prompt > self.num_inference_steps:
            raise ValueError("calibration.steps_per_prompt must not exceed calibration.num_inference_steps")
        return self

    @property
    def call_kwargs(self) -> dict[str, Any] | None:
        """Extra pipeline-call arguments (the calibration size) for ``quantize_pipeline(..., call_kwargs=)``."""
        if self.height is None or self.width is None:
            return None
        return {"height": self.height, "width": self.width}

    def at_serving_conditions(self, sizes: SizeRule, defaults: GenerationDefaults) -> None:
        """Fill what the registry left open with the conditions the model is served at (its ModelSpec does)."""
        self.height = self.height or sizes.default
        self.width = self.width or sizes.default
        self.num_inference_steps = self.num_inference_steps or defaults.num_inference_steps
        if self.guidance_scale is None:
            self.guidance_scale = defaults.guidance_scale
        if "steps_per_prompt" not in self.model_fields_set:
            self.steps_per_prompt = min(self.steps_per_prompt, self.num_inference_steps)
        if self.steps_per_prompt > self.num_inference_steps:
            raise ValueError(
                f"calibration.steps_per_prompt ({self.steps_per_prompt}) must not exceed the "
                f"calibration steps ({self.num_inference_steps})"
            )


class VariantSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=NAME_PATTERN)
    recipe: str = Field(min_length=1, description="a segquant_core recipe name, with optional switches")
    artifact: Path | None = Field(None, description="artifact folder; default <cache_dir>/<model>/<variant>")
    eval_report: Path | None = Field(None, description=f"fidelity JSON; default <artifact>/{EVAL_REPORT_FILE}")
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec)
    description: str = ""
    compile: Literal["auto", "on", "off"] = Field(
        "auto", description="torch.compile the denoiser at load; auto = on where measured faster (docs/benchmarks.md)"
    )

    @property
    def quantized(self) -> bool:
        """Whether the variant needs an artifact (``fp`` runs the source weights as they are)."""
        return self.recipe.split(":", 1)[0] != "fp"


class GenerationDefaults(BaseModel):
    model_config = ConfigDict(extra="forbid")
    num_inference_steps: int = Field(20, ge=1)
    guidance_scale: float = Field(3.0, ge=0)


class EvalSpec(BaseModel):
    """Fidelity measured right after a worker builds a variant: ``prompts`` × ``seeds`` images against ``fp``."""

    model_config = ConfigDict(extra="forbid")
    prompts: int = Field(8, ge=0, description="evaluation prompts, disjoint from calibration; 0 = no evaluation")
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    num_inference_steps: int | None = Field(None, ge=1, description="default: the model's default steps")
    prompts_file: Path | None = None


class ModelSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=NAME_PATTERN)
    source: str = Field(min_length=1)
    description: str = ""
    default_variant: str | None = None
    sizes: SizeRule | None = Field(None, description="derived from the pipeline's configs; given fields win")
    drop_components: list[str] = Field(
        default_factory=list, description="optional components loaded as None, e.g. [text_encoder_3]"
    )
    defaults: GenerationDefaults = Field(default_factory=GenerationDefaults)
    build_on_demand: bool = Field(True, description="a job for an unbuilt variant starts its build (else: 409)")
    eval: EvalSpec = Field(default_factory=EvalSpec)
    variants: list[VariantSpec] = Field(min_length=1)
    adapters: list[AdapterSpec] = Field(default_factory=list, description="LoRA adapters requests may name")

    @model_validator(mode="before")
    @classmethod
    def _partial_sizes(cls, data: Any) -> Any:
        """``sizes: {default: 512}`` keeps the derived step and bounds and changes only the default."""
        if isinstance(data, dict) and isinstance(data.get("sizes"), dict) and isinstance(data.get("source"), str):
            given = data["sizes"]
            if set(SizeRule.model_fields) - set(given):
                data = {**data, "sizes": {**derive_size_rule(data["source"]).model_dump(), **given}}
        return data

    @field_validator("variants", mode="before")
    @classmethod
    def _short_form(cls, v: Any) -> Any:
        if isinstance(v, list):
            return [{"name": x, "recipe": x} if isinstance(x, str) else x for x in v]
        return v

    @model_validator(mode="after")
    def _check(self) -> ModelSpec:
        names = [v.name for v in self.variants]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"model {self.name!r}: duplicate variant names {dupes}")
        adapter_names = [a.name for a in self.adapters]
        adapter_dupes = sorted({n for n in adapter_names if adapter_names.count(n) > 1})
        if adapter_dupes:
            raise ValueError(f"model {self.name!r}: duplicate adapter names {adapter_dupes}")
        if self.default_variant is None:
            self.default_variant = "fp" if "fp" in names else names[0]
        elif self.default_variant not in names:
            raise ValueError(f"model {self.name!r}: default_variant {self.default_variant!r} is not one of {names}")
        if self.sizes is None:
            self.sizes = derive_size_rule(self.source)
        for variant in self.variants:  # calibrate where the model is served, unless the variant says otherwise
            try:
                variant.calibration.at_serving_conditions(self.sizes, self.defaults)
            except ValueError as e:
                raise ValueError(f"model {self.name!r}, variant {variant.name!r}: {e}") from None
        folder = source_pipeline_dir(self.source)
        if self.drop_components and folder is not None and (folder / "model_index.json").is_file():
            try:
                expand_drop(json.loads((folder / "model_index.json").read_text()), self.drop_components)
            except ValueError as e:
                raise ValueError(f"model {self.name!r}: drop_components: {e}") from None
        return self

    def components(self) -> list[str] | None:
        """The pipeline components this model runs with (saved, not null, not dropped); None when unknown."""
        folder = source_pipeline_dir(self.source)
        if folder is None or not (folder / "model_index.json").is_file():
            return None
        return active_components(json.loads((folder / "model_index.json").read_text()), self.drop_components)

    def variant(self, name: str | None) -> VariantSpec:
        wanted = name or self.default_variant
        for v in self.variants:
            if v.name == wanted:
                return v
        raise UnknownModelError("variant", str(wanted), [v.name for v in self.variants])

    def adapter(self, name: str) -> AdapterSpec:
        for a in self.adapters:
            if a.name == name:
                return a
        raise UnknownModelError("adapter", name, [a.name for a in self.adapters], model=self.name)

    @property
    def size_rule(self) -> SizeRule:
        assert self.sizes is not None  # set by the validator
        return self.sizes


@dataclass(frozen=True)
class VariantKey:
    """(model, variant): the unit of routing, loading and metrics labels."""

    model: str
    variant: str

    def __str__(self) -> str:
        return f"{self.model}:{self.variant}"

    @classmethod
    def parse(cls, text: str) -> VariantKey:
        model, sep, variant = text.partition(":")
        if not sep or not model or not variant:
            raise ValueError(f"expected MODEL:VARIANT, got {text!r}")
        return cls(model, variant)


class Registry:
    """Models × variants, in file order (the first model is the default)."""

    def __init__(self, models: list[ModelSpec]) -> None:
        if not models:
            raise ValueError("the registry lists no models")
        names = [m.name for m in models]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate model names in the registry: {names}")
        self.models: dict[str, ModelSpec] = {m.name: m for m in models}

    @classmethod
    def from_data(cls, data: list[dict[str, Any]] | dict[str, Any]) -> Registry:
        entries = data.get("models") if isinstance(data, dict) else data
        if not isinstance(entries, list):
            raise ValueError("the registry must be a list of models (or a mapping with a 'models' list)")
        return cls([ModelSpec.model_validate(e) for e in entries])

    @classmethod
    def from_file(cls, path: str | Path) -> Registry:
        return cls.from_data(_read_structured(Path(path)))

    @classmethod
    def default(cls) -> Registry:
        """The project's shipped models (MMDiT first), each with the fp reference and the two SegQuant recipes."""
        entries = []
        for name, shipped_name, description in DEFAULT_SHIPPED_MODELS:
            variants: list[Any] = ["fp"]
            for recipe in DEFAULT_RECIPES:  # checkpoints built by `python -m segquant_cli.shipped_checkpoints`
                shipped = shipped_checkpoint_dir(shipped_name, recipe)
                variants.append({"name": recipe, "recipe": recipe, **({"artifact": shipped} if shipped else {})})
            entries.append(
                {
                    "name": name,
                    "source": f"shipped:{shipped_name}",
                    "description": description,
                    "variants": variants,
                    "adapters": shipped_adapters(shipped_name),
                }
            )
        return cls.from_data(entries)

    @classmethod
    def from_settings(cls, settings: Any) -> Registry:
        if settings.models:
            return cls.from_data(settings.models)
        if settings.registry_file:
            return cls.from_file(settings.registry_file)
        return cls.default()

    @property
    def default_model(self) -> ModelSpec:
        return next(iter(self.models.values()))

    def model(self, name: str | None) -> ModelSpec:
        if name is None:
            return self.default_model
        spec = self.models.get(name)
        if spec is None:
            raise UnknownModelError("model", name, list(self.models))
        return spec

    def variant_keys(self) -> list[VariantKey]:
        return [VariantKey(m.name, v.name) for m in self.models.values() for v in m.variants]

    def select(self, patterns: list[str]) -> list[VariantKey]:
        """The variants matching ``model:variant`` / ``model:*`` / ``model`` patterns (all when empty)."""
        if not patterns:
            return self.variant_keys()
        chosen: list[VariantKey] = []
        for pattern in patterns:
            model, _, variant = pattern.partition(":")
            spec = self.model(model)
            names = [v.name for v in spec.variants] if variant in ("", "*") else [spec.variant(variant).name]
            chosen += [VariantKey(model, n) for n in names if VariantKey(model, n) not in chosen]
        return chosen

    def artifact_dir(self, key: VariantKey, cache_dir: Path) -> Path:
        spec = self.model(key.model).variant(key.variant)
        return spec.artifact.expanduser() if spec.artifact else cache_dir / key.model / key.variant

    def eval_report_path(self, key: VariantKey, cache_dir: Path) -> Path:
        spec = self.model(key.model).variant(key.variant)
        return (
            spec.eval_report.expanduser() if spec.eval_report else self.artifact_dir(key, cache_dir) / EVAL_REPORT_FILE
        )


def shipped_checkpoint_dir(model: str, variant: str) -> Path | None:
    """The quantized checkpoint shipped with ``segquant_shapes`` for ``model``'s ``variant``, if there is one."""
    spec = importlib.util.find_spec("segquant_shapes")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "weights" / model / "variants" / variant
    return folder if (folder / "manifest.json").is_file() else None


def shipped_adapters(model: str) -> list[dict[str, str]]:
    """Registry entries for the adapters shipped with a ``segquant_shapes`` model (folders with a card)."""
    root = shipped_dir(model)
    folder = root / "loras" if root is not None else None
    if folder is None or not folder.is_dir():
        return []
    return [
        {"name": d.name, "path": f"shipped:{model}/{d.name}"}
        for d in sorted(folder.iterdir())
        if (d / ADAPTER_CARD_FILE).is_file()
    ]


def _read_structured(path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"registry file {path} does not exist")
    text = path.read_text()
    suffix = path.suffix.lower()
    if suffix in (".yaml", ".yml"):
        import yaml

        return yaml.safe_load(text)
    if suffix == ".toml":
        try:
            import tomllib
        except ImportError:  # Python 3.10
            import tomli as tomllib

        return tomllib.loads(text)
    if suffix == ".json":
        return json.loads(text)
    raise ValueError(f"registry file {path}: unknown format {suffix!r} (use .yaml, .toml or .json)")


def shipped_dir(name: str) -> Path | None:
    """Folder of a shipped ``segquant_shapes`` pipeline, found without importing torch."""
    spec = importlib.util.find_spec("segquant_shapes")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "weights" / name


def source_pipeline_dir(source: str) -> Path | None:
    """The local pipeline folder a source names, if it has one."""
    if source.startswith("shipped:"):
        return shipped_dir(source.split(":", 1)[1])
    if source.startswith("tiny:"):
        return None
    path = Path(source).expanduser()
    return path if path.exists() else None


@dataclass(frozen=True)
class _SourceConfigs:
    """What the size rule reads from a source's folder: pipeline class and the denoiser's and VAE's configs."""

    pipeline_class: str
    denoiser: dict[str, Any]
    vae: dict[str, Any] | None  # None: pixel space (no VAE)


def _source_configs(source: str) -> _SourceConfigs | None:
    """The configs of a source, read from disk (no torch); None when unknown."""
    if source.startswith("tiny:"):  # built by the worker (torch); the API needs only the size-relevant keys
        tiny = preset_size_config(f"{source.split(':')[1]}-tiny")
        return _SourceConfigs("Shapes", tiny, None) if tiny else None
    folder = source_pipeline_dir(source)
    if folder is not None:
        index_file = folder / "model_index.json"
        index = json.loads(index_file.read_text()) if index_file.is_file() else {}
        vae_file = folder / "vae" / "config.json"
        vae = json.loads(vae_file.read_text()) if vae_file.is_file() else None
        for component in ("transformer", "unet"):
            cfg = folder / component / "config.json"
            if cfg.is_file():
                return _SourceConfigs(str(index.get("_class_name", "")), json.loads(cfg.read_text()), vae)
    if source.startswith("shipped:"):  # weights not on this machine (e.g. an API-only host): the preset
        preset = preset_size_config(source.split(":", 1)[1])
        return _SourceConfigs("Shapes", preset, None) if preset else None
    return None


def vae_scale_factor(vae: dict[str, Any] | None) -> int:
    """Pixels per latent cell: ``2 ** (len(block_out_channels) - 1)``, as diffusers pipelines compute it."""
    if vae is None:
        return 1
    blocks = vae.get("block_out_channels") or [0, 0, 0, 0]
    return 2 ** (len(blocks) - 1)


def _lcm(a: int, b: int) -> int:
    return a * b // math.gcd(a, b)


def derive_size_rule(source: str) -> SizeRule:
    """Sizes a pipeline renders exactly, from its configs (never assumed constants).

    step = VAE scale × what the denoiser needs per latent cell: the DiT patch (SD3, PixArt), Flux's 2×2
    latent packing; UNets and the pipelines that check ``% 8`` (SDXL, PixArt) also need a multiple of 8.
    The default is the pipeline's own default resolution (``sample_size`` × VAE scale; Flux has no
    ``sample_size`` and defaults to 128 latent cells, except the project's pixel-space Shapes Flux, whose
    pipeline defaults to 32 like the other Shapes pipelines); the maximum is the position table of SD3-style
    transformers, else twice (DiTs) or four times (UNets) the default.
    """
    found = _source_configs(source)
    if found is None:
        return SizeRule()
    cfg, scale = found.denoiser, vae_scale_factor(found.vae)
    cls = found.pipeline_class
    flux = "Flux" in cls or "guidance_embeds" in cfg or "axes_dims_rope" in cfg
    sample = cfg.get("sample_size")
    flux_default = 32 if cls.startswith("Shapes") else 128
    latent_default = int(sample[0] if isinstance(sample, (list, tuple)) else sample or (flux_default if flux else 64))
    default = latent_default * scale
    patch = int(cfg.get("patch_size") or 1)
    if flux:
        step = scale * 2 * patch
    elif "patch_size" in cfg:
        step = scale * patch
    else:
        step = scale
    unet = "patch_size" not in cfg and not flux
    if unet or (found.vae is not None and ("PixArt" in cls or "XL" in cls)):
        step = _lcm(step, 8)  # UNets downsample; SDXL and PixArt pipelines refuse other sizes
    table = cfg.get("pos_embed_max_size")
    if table:
        top = scale * patch * int(table) // step * step
    else:
        top = default * (4 if unet else 2)
    default = max(step, min(default, top) // step * step)
    return SizeRule(multiple_of=step, min=step, max=max(top, step), default=default)


def parse_size(text: str) -> tuple[int, int]:
    """``"WxH"`` → (width, height)."""
    m = re.fullmatch(r"\s*(\d{1,5})\s*[xX×]\s*(\d{1,5})\s*", text)
    if not m:
        raise ValueError(f"size must look like WIDTHxHEIGHT, e.g. 32x32 (got {text!r})")
    return int(m.group(1)), int(m.group(2))
