"""What the running app holds (one typed object instead of loose ``app.state`` attributes)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from service.api.job_service import JobService
from service.jobs.queue import JobQueue
from service.metrics import Metrics
from service.registry import Registry
from service.settings import Settings


@dataclass
class AppState:
    settings: Settings
    registry: Registry
    queue: JobQueue
    jobs: JobService
    metrics: Metrics
    runner: Any | None = None  # service.worker.runner.Runner in embedded mode (kept untyped: no torch import here)
    runner_task: asyncio.Task[None] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
