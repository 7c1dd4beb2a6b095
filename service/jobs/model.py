"""The job: what was asked (resolved parameters, seeds included), where it is, and what came out.

Jobs travel as pydantic JSON (never pickle). Parameters are fully resolved at submission — defaults
filled in and seeds drawn — so a redelivered job produces exactly the images the first attempt would have.
"""

from __future__ import annotations

import uuid
from enum import Enum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

OutputFormat = Literal["png", "jpeg", "webp"]
MEDIA_TYPES: dict[str, str] = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


class JobState(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"
    EXPIRED = "expired"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELED, JobState.EXPIRED})


class FailureReason(str, Enum):
    """Why a job failed: a bounded set, so it can be a metric label."""

    OOM = "oom"
    WORKER_LOST = "worker_lost"  # its workers died max_deliveries times: dead-lettered
    MODEL_UNAVAILABLE = "model_unavailable"  # the variant could not be built or loaded
    INVALID = "invalid"  # the pipeline rejected the parameters
    STALLED = "stalled"  # no denoising step for worker.step_timeout_s (a hung kernel or call)
    INTERNAL = "internal"


class DebugOptions(BaseModel):
    """Test-only hooks, accepted only when ``debug_hooks`` is on in the settings of API *and* worker."""

    model_config = ConfigDict(extra="forbid")
    crash_worker: bool = Field(False, description="the worker process exits (os._exit) at the first step")
    hang_first_attempt: bool = Field(
        False,
        description="the first attempt's first step hangs for an hour (a "
        "call the worker cannot stop; later attempts run normally)",
    )
    step_delay_s: float = Field(
        0.0,
        ge=0,
        le=5,
        description="sleep after every denoising step (slow jobs on purpose, to kill or stop a worker mid-job)",
    )


class AdapterUse(BaseModel):
    """One LoRA adapter of a job, resolved: a registry name and the scale it runs at."""

    model_config = ConfigDict(extra="forbid")
    name: str
    scale: float = Field(allow_inf_nan=False)


class GenerationParams(BaseModel):
    """A validated, fully resolved generation request."""

    model_config = ConfigDict(extra="forbid")
    prompt: str
    negative_prompt: str | None = None
    model: str
    variant: str
    width: int
    height: int
    num_inference_steps: int
    guidance_scale: float
    seeds: list[int] = Field(min_length=1, description="one seed per image; image i uses its own generator")
    output_format: OutputFormat = "png"
    loras: list[AdapterUse] = Field(default_factory=list, description="adapters in the order the request gave")
    debug: DebugOptions | None = None

    @property
    def n(self) -> int:
        return len(self.seeds)

    def adapter_scales(self) -> dict[str, float]:
        """The adapter set as the worker activates it, ordered by name (the same set always stacks the same)."""
        return {a.name: a.scale for a in sorted(self.loras, key=lambda a: a.name)}

    def batch_key(self) -> tuple[Any, ...]:
        """Jobs with equal keys can share one pipeline call (the adapter set and scales included)."""
        return (
            self.model,
            self.variant,
            self.width,
            self.height,
            self.num_inference_steps,
            self.guidance_scale,
            tuple(self.adapter_scales().items()),
        )


class ImageOut(BaseModel):
    b64_json: str
    seed: int
    format: OutputFormat
    width: int
    height: int


class Timings(BaseModel):
    queue_wait_s: float = Field(description="submission to start of the attempt that succeeded")
    load_s: float = Field(0.0, description="loading (or building) the variant, when this job had to wait for it")
    inference_s: float = Field(description="the pipeline call (shared by every job of its batch)")
    encode_s: float = 0.0
    total_s: float = Field(description="submission to result")


class JobResult(BaseModel):
    images: list[ImageOut]
    timings: Timings
    worker_id: str
    batch_size: int = Field(description="images in the pipeline call that produced these")
    precision: str = ""


class JobError(BaseModel):
    reason: str
    message: str


class Progress(BaseModel):
    step: int
    total: int


class Job(BaseModel):
    id: str
    state: JobState
    params: GenerationParams
    created_at: float
    deadline_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    attempts: int = 0
    worker_id: str | None = None
    cancel_requested: bool = False
    progress: Progress | None = None
    result: JobResult | None = None
    error: JobError | None = None

    @staticmethod
    def new_id() -> str:
        return uuid.uuid4().hex


class JobEvent(BaseModel):
    """One entry of a job's event log (SSE): queued, started, progress, cancel_requested, requeued, terminal."""

    id: str
    type: str
    data: dict[str, Any] = Field(default_factory=dict)

    @property
    def terminal(self) -> bool:
        return self.type in {s.value for s in TERMINAL_STATES}
