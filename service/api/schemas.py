"""Request and response bodies of the HTTP API (torch-free; limits that depend on settings or on the model
are checked in :mod:`service.api.job_service` and answered with the same 422 shape)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator

from service.jobs.model import (
    AdapterUse,
    DebugOptions,
    GenerationParams,
    JobError,
    JobResult,
    JobState,
    OutputFormat,
    Progress,
    Timings,
)
from service.jobs.queue import BuildProgress
from service.registry import GenerationDefaults, SizeRule

MAX_SEED = 2**63 - 1
MIN_DEADLINE_S = 1.0  # below this a job expires before any worker can start it: a client mistake, not a 504
NOT_BLANK: dict[str, Any] = {"pattern": r"\S"}  # the schema's word for _not_blank: some non-space character
SIZE_PATTERN = r"^(auto|\s*[0-9]{1,5}\s*[xX×]\s*[0-9]{1,5}\s*)$"


def _not_blank(v: str) -> str:
    if not v.strip():
        raise ValueError("must not be empty")
    return v


class LoraRequest(BaseModel):
    """One adapter a request asks for: a name from ``GET /models`` (``adapters``) and an optional scale."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=64, description="an adapter name the model lists in GET /models")
    scale: float | None = Field(
        None,
        allow_inf_nan=False,
        description="strength; |scale| ≤ limits.max_lora_scale (4); null = the adapter's default scale",
    )


LORAS_FIELD_DOC = "LoRA adapters to apply, at most limits.max_loras_per_request (3), each name once"


class GenerateRequest(BaseModel):
    """A text-to-image request (``POST /generate``, ``POST /jobs``). Unset fields take the model's defaults."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"prompt": "a red circle", "seed": 7, "n": 1, "output_format": "png"},
                {"prompt": "an outlined red circle", "seed": 7, "loras": [{"name": "outlined", "scale": 2.0}]},
            ]
        },
    )

    prompt: str = Field(
        description="what to draw; at most limits.max_prompt_chars characters (default 1000)",
        json_schema_extra=NOT_BLANK,
    )
    negative_prompt: str | None = Field(None, description="what to steer away from (same length limit)")
    model: str | None = Field(None, description="a model name from GET /models; default: the first one")
    variant: str | None = Field(None, description="fp or a quantized variant; default: the model's default")
    width: int | None = Field(None, ge=1, description="pixels; a multiple of the model's size step, in bounds")
    height: int | None = Field(None, ge=1)
    num_inference_steps: int | None = Field(None, ge=1, description="1..limits.max_inference_steps (100)")
    guidance_scale: float | None = Field(None, ge=0, description="0..limits.max_guidance_scale (30); ≤1 = no CFG")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="null = random; image i uses seed + i")
    n: int = Field(1, ge=1, description="images; 1..limits.max_images (4)")
    output_format: OutputFormat = "png"
    deadline_s: float | None = Field(
        None,
        ge=MIN_DEADLINE_S,
        description="expire instead of starting later than this (s); at least 1 s: no job can start sooner",
    )
    loras: list[LoraRequest] = Field(default_factory=list, description=LORAS_FIELD_DOC)
    debug: DebugOptions | None = Field(None, description="test-only hooks; refused unless enabled in settings")

    _prompt = field_validator("prompt")(_not_blank)


class ImagePublic(BaseModel):
    b64_json: str
    seed: int
    format: OutputFormat
    width: int
    height: int


class GenerateResponse(BaseModel):
    """The synchronous answer: images plus everything needed to reproduce them."""

    id: str
    model: str
    variant: str
    precision: str
    seeds: list[int]
    width: int
    height: int
    num_inference_steps: int
    guidance_scale: float
    loras: list[AdapterUse] = Field(default_factory=list, description="the adapters applied, at their scales")
    images: list[ImagePublic]
    timings: Timings
    worker_id: str
    batch_size: int


class JobLinks(BaseModel):
    self: str
    events: str


class JobPublic(BaseModel):
    """A job as clients see it (``GET /jobs/{id}``, 202 answers, the SSE terminal event)."""

    id: str
    state: JobState
    model: str
    variant: str
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    deadline_at: datetime | None = None
    queue_position: int | None = Field(None, description="1 = next to start (queued jobs only)")
    eta_s: float | None = Field(None, description="estimated seconds until it starts (queued jobs only)")
    waiting_for_build: BuildProgress | None = Field(
        None, description="queued while a worker builds its variant: the build's phase, done/total and eta_s"
    )
    progress: Progress | None = None
    attempts: int = 0
    worker_id: str | None = None
    cancel_requested: bool = False
    params: GenerationParams
    result: JobResult | None = None
    error: JobError | None = None
    links: JobLinks


class LatencyPublic(BaseModel):
    samples: int
    inference_p50_s: float | None = None
    inference_p95_s: float | None = None
    total_p50_s: float | None = None
    total_p95_s: float | None = None


class VariantPublic(BaseModel):
    name: str
    recipe: str
    state: Literal["not_built", "available", "building", "loaded", "failed"]
    reason: str | None = None
    precision: str | None = Field(
        None,
        description="compute dtype of the float parts (the fp variant's precision): bfloat16 on GPUs and on CPUs "
        "with AVX512-BF16 or AMX, else float32",
    )
    device: str | None = None
    weight_bytes: int | None = Field(None, description="denoiser weights as loaded (quantized layers included)")
    peak_memory_bytes: int | None = None
    memory_kind: str | None = None
    load_seconds: float | None = None
    compile_s: float | None = Field(None, description="torch.compile warm-up at load; null: the variant runs eagerly")
    progress: BuildProgress | None = Field(None, description="while building: phase, done, total, eta_s")
    shared_bytes: int | None = Field(
        None,
        description="the model's shared parts (text encoders, VAE, tokenizers), "
        "one copy per worker for all its variants",
    )
    latency: LatencyPublic
    fidelity: dict[str, Any] | None = Field(None, description="the variant's eval.json, when one exists")
    artifact: str | None = None
    workers_loaded: int = 0
    calibration: dict[str, Any] | None = Field(
        None, description="where a missing artifact is calibrated: height, width, steps, guidance, samples"
    )


class BuildAccepted(BaseModel):
    """The answer of ``POST /models/{model}/variants/{variant}/build``."""

    model: str
    variant: str
    state: Literal["not_built", "available", "building", "loaded", "failed"]
    progress: BuildProgress | None = None
    workers: int = Field(description="live workers serving the variant (one of them builds it)")
    message: str


class AdapterPublic(BaseModel):
    """A model's adapter as clients see it (the path stays the server's business)."""

    name: str
    scale: float = Field(description="the default scale (a request's loras[].scale overrides it)")
    description: str = ""
    trigger: str | None = Field(None, description="a word prompts should contain for the adapter to show")


class ModelPublic(BaseModel):
    name: str
    source: str
    description: str
    default_variant: str
    sizes: SizeRule
    defaults: GenerationDefaults
    components: list[str] | None = Field(None, description="pipeline components it runs with (None: unknown)")
    drop_components: list[str] = Field(default_factory=list, description="components left out on purpose")
    variants: list[VariantPublic]
    adapters: list[AdapterPublic] = Field(default_factory=list, description="LoRA adapters requests may name")


class ModelsPublic(BaseModel):
    data: list[ModelPublic]


class OpenAIImageRequest(BaseModel):
    """OpenAI ``/v1/images/generations`` body, plus the usual self-hosted extension fields."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    prompt: str = Field(
        description="what to draw (not blank); at most limits.max_prompt_chars characters", json_schema_extra=NOT_BLANK
    )
    model: str | None = None
    n: int = Field(1, ge=1, description="images; 1..limits.max_images (4)")
    size: str | None = Field(
        None,
        json_schema_extra={"pattern": SIZE_PATTERN},
        description="WIDTHxHEIGHT (within the model's sizes) or 'auto'",
    )
    response_format: Literal["b64_json"] = Field("b64_json", description="only b64_json: no hosted URLs")
    output_format: OutputFormat = "png"
    quality: str | None = None
    style: str | None = None
    user: str | None = None
    # extensions (OpenAI SDK: extra_body={...})
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    num_inference_steps: int | None = Field(None, ge=1, validation_alias=AliasChoices("num_inference_steps", "steps"))
    guidance_scale: float | None = Field(None, ge=0, validation_alias=AliasChoices("guidance_scale", "guidance"))
    negative_prompt: str | None = None
    variant: str | None = None
    loras: list[LoraRequest] = Field(default_factory=list, description=LORAS_FIELD_DOC)

    _prompt = field_validator("prompt")(_not_blank)

    @field_validator("response_format", mode="before")
    @classmethod
    def _b64_only(cls, v: Any) -> Any:
        if v != "b64_json":
            raise ValueError("only 'b64_json' is supported (no hosted URLs)")
        return v


class OpenAIImage(BaseModel):
    b64_json: str
    revised_prompt: str | None = None
    seed: int


class OpenAIImagesResponse(BaseModel):
    created: int
    data: list[OpenAIImage]
    model: str
    variant: str
    output_format: OutputFormat
    size: str
    loras: list[AdapterUse] = Field(default_factory=list, description="the adapters applied, at their scales")
