"""One settings object for the API and the workers: defaults < config file < ``SEGQUANT_*`` env < CLI flags.

The config file (``--config`` or ``SEGQUANT_CONFIG``) may be YAML, TOML or JSON; nested groups use ``__`` in
environment variables (``SEGQUANT_QUEUE__MAX_DEPTH=200``). Settings are read once per process
(:func:`get_settings`) and passed down explicitly; nothing reads the environment at import time.
"""

from __future__ import annotations

import contextvars
import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    JsonConfigSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
    YamlConfigSettingsSource,
)

ENV_PREFIX = "SEGQUANT_"
CONFIG_ENV = "SEGQUANT_CONFIG"

_config_file: contextvars.ContextVar[Path | None] = contextvars.ContextVar("segquant_config_file", default=None)


class LimitSettings(BaseModel):
    """Request limits; every one of them is checked with a 422 that names the field and the limit."""

    max_prompt_chars: int = Field(1000, ge=1, description="longest prompt / negative prompt, in characters")
    max_images: int = Field(4, ge=1, description="largest n per request")
    max_inference_steps: int = Field(100, ge=1)
    max_guidance_scale: float = Field(30.0, gt=0)
    max_body_bytes: int = Field(64 * 1024, ge=1024, description="request bodies above this get 413")
    sync_timeout_s: float = Field(300.0, gt=0, description="POST /generate waits this long, then answers 202")
    max_deadline_s: float = Field(24 * 3600.0, gt=0)
    max_loras_per_request: int = Field(3, ge=0, description="adapters one request may name in loras (0 = none)")
    max_lora_scale: float = Field(4.0, gt=0, allow_inf_nan=False, description="largest |scale| of an adapter")


class QueueSettings(BaseModel):
    """Queue bounds and the crash-recovery clock (reclaim idle time must exceed a few heartbeats)."""

    max_depth: int = Field(64, ge=1, description="queued (not yet started) jobs across all variants; above: 503")
    max_depth_per_variant: int | None = Field(
        None,
        ge=1,
        description="queued jobs of one variant; default: max_depth shared evenly by the registry's "
        "variants (at least 1), so one variant's backlog cannot take every other variant's room",
    )
    unserved_timeout_s: float = Field(
        120.0,
        ge=0,
        description="a queued job whose variant no live worker has served for this long fails "
        "with reason 'unserved'; 0 = at once",
    )
    result_ttl_s: int = Field(3600, ge=1, description="how long finished jobs and their results are kept")
    idempotency_ttl_s: int = Field(24 * 3600, ge=1)
    max_deliveries: int = Field(3, ge=1, description="deliveries before a job goes to the dead-letter stream")
    heartbeat_interval_s: float = Field(5.0, gt=0)
    reclaim_idle_s: float = Field(30.0, gt=0, description="a pending entry idle this long is reclaimed")
    default_deadline_s: float | None = Field(None, gt=0, description="jobs not started by then expire")
    stream_maxlen: int = Field(100_000, ge=1000, description="approximate cap on each variant stream")
    default_service_s: float = Field(5.0, gt=0, description="service time assumed before any job was measured")

    @model_validator(mode="after")
    def _reclaim_after_heartbeats(self) -> QueueSettings:
        if self.reclaim_idle_s < 2 * self.heartbeat_interval_s:
            raise ValueError(
                f"queue.reclaim_idle_s ({self.reclaim_idle_s}) must be at least twice "
                f"queue.heartbeat_interval_s ({self.heartbeat_interval_s}), or live jobs get stolen"
            )
        return self


class WorkerSettings(BaseModel):
    """What a worker serves and how it batches; ``variants`` entries are ``model:variant`` or ``model:*``."""

    id: str | None = Field(None, description="consumer name; default host-pid-random")
    variants: list[str] = Field(default_factory=list, description="served variants; empty = every registry variant")
    preload: list[str] | None = Field(
        None,
        description="variants loaded before the worker reports ready; "
        "default: the first served model's default variant "
        "(the other models load on their first job)",
    )
    warmup: bool = Field(True, description="run a one-step generation after loading a variant (lazy setup costs)")
    max_loaded_variants: int = Field(3, ge=1, description="pipelines kept in memory (LRU)")
    max_batch_size: int = Field(4, ge=1, description="images per pipeline call when batching compatible jobs")
    adapter_cache_size: int = Field(
        4, ge=1, description="LoRA adapters kept loaded per denoiser (LRU); at least limits.max_loras_per_request"
    )
    batch_wait_ms: int = Field(50, ge=0, description="how long to wait for more compatible jobs")
    drain_timeout_s: float = Field(
        60.0, ge=0, description="on SIGTERM: finish the running batch this long, then stop it and hand its jobs back"
    )
    memory_budget_bytes: int | None = Field(
        None, ge=1, description="estimated activation bytes per pipeline call above which it fails with 'oom'"
    )
    metrics_port: int = Field(0, ge=0, le=65535, description="worker /metrics port; 0 = off")
    cancel_poll_s: float = Field(0.25, gt=0)
    step_timeout_s: float | None = Field(
        None,
        gt=0,
        description="a call with no denoising step for this long is stalled: its jobs fail with "
        "'stalled', and a call that does not stop then makes the worker exit non-zero (supervisor restarts it, "
        "the jobs are reclaimed); default: 20 x the variant's median step time, never below 60 s",
    )


class Settings(BaseSettings):
    """Everything configurable; see docs/service.md for the file format."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    redis_url: str | None = Field(None, description="no URL: embedded mode (in-process queue and worker)")
    key_prefix: str = Field("segquant", pattern=r"^[A-Za-z0-9_.:-]+$", description="prefix of every Redis key")
    embedded_worker: bool | None = Field(
        None, description="run a worker inside the API process; default: only without a Redis URL"
    )
    registry_file: Path | None = Field(None, description="YAML/TOML/JSON model registry; default: shipped model")
    models: list[dict[str, Any]] | None = Field(None, description="inline registry (instead of registry_file)")
    cache_dir: Path = Field(Path("~/.cache/segquant-serve").expanduser(), description="built artifacts live here")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="precision of the fp variant and of every variant's float parts: auto = bf16/fp16 on "
        "GPU, bf16 on CPUs with AVX512-BF16 or AMX, fp32 on other CPUs",
    )
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list, description="empty = no authentication; env: comma-separated or a JSON list"
    )
    debug_hooks: bool = Field(False, description="accept the test-only 'debug' request field (never in prod)")
    log_level: str = "INFO"
    limits: LimitSettings = Field(default_factory=LimitSettings)
    queue: QueueSettings = Field(default_factory=QueueSettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)

    @field_validator("cache_dir", "registry_file", mode="after")
    @classmethod
    def _expand(cls, v: Path | None) -> Path | None:
        return None if v is None else v.expanduser()

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, v: Any) -> Any:
        if isinstance(v, str):  # SEGQUANT_API_KEYS=key1,key2 (or a JSON list)
            if v.strip().startswith("["):
                return json.loads(v)
            return [k.strip() for k in v.split(",") if k.strip()]
        return v

    @model_validator(mode="after")
    def _adapters_fit_the_cache(self) -> Settings:
        if self.worker.adapter_cache_size < self.limits.max_loras_per_request:
            raise ValueError(
                f"worker.adapter_cache_size ({self.worker.adapter_cache_size}) must be at least "
                f"limits.max_loras_per_request ({self.limits.max_loras_per_request}): one batch's "
                "adapters must all stay loaded"
            )
        return self

    @model_validator(mode="after")
    def _no_placeholder_keys(self) -> Settings:
        for key in self.api_keys:
            if key.get_secret_value() in ("changeme", "change-me", "secret", ""):
                raise ValueError("api_keys contains a placeholder value; set real keys or none")
        return self

    @property
    def embedded(self) -> bool:
        """Whether this process runs a worker next to the API."""
        return self.redis_url is None if self.embedded_worker is None else self.embedded_worker

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = _config_file.get() or (Path(os.environ[CONFIG_ENV]) if os.environ.get(CONFIG_ENV) else None)
        if path is not None:
            sources.append(_file_source(settings_cls, path))
        return tuple(sources)


def _file_source(settings_cls: type[BaseSettings], path: Path) -> PydanticBaseSettingsSource:
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix in (".yaml", ".yml"):
        return YamlConfigSettingsSource(settings_cls, yaml_file=path)
    if suffix == ".toml":
        return TomlConfigSettingsSource(settings_cls, toml_file=path)
    if suffix == ".json":
        return JsonConfigSettingsSource(settings_cls, json_file=path)
    raise ValueError(f"config file {path}: unknown format {suffix!r} (use .yaml, .toml or .json)")


def load_settings(config_file: str | Path | None = None, **overrides: Any) -> Settings:
    """Settings from ``config_file`` (or ``SEGQUANT_CONFIG``), the environment and explicit overrides.

    ``overrides`` with value ``None`` are ignored, so CLI flags that were not given do not mask the file.
    """
    token = _config_file.set(Path(config_file).expanduser() if config_file else None)
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    finally:
        _config_file.reset(token)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings (FastAPI dependency; tests build their own and pass them to ``create_app``)."""
    return load_settings()
