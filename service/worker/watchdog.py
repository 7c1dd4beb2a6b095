"""The progress watchdog: a pipeline call with no denoising step for too long is stalled.

The heartbeat only proves the worker's event loop is alive; a call that hangs in a kernel (a deadlock, a hung
CUDA call) would hold its jobs forever. Every running call reports each denoising step here. With no step for
the variant's step timeout, the call is marked stalled: its step callback stops it at the next step and its
jobs fail with reason ``stalled``. A call that has not stopped a grace period later cannot be stopped from
Python, so the worker process exits non-zero: its supervisor restarts it, and the jobs, never acknowledged,
are reclaimed by another worker (and dead-lettered after ``max_deliveries`` such crashes).
"""

from __future__ import annotations

import asyncio
import logging
import os
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from service.registry import VariantKey

logger = logging.getLogger(__name__)

STALLED_EXIT_CODE = 87
MIN_STEP_TIMEOUT_S = 60.0
STEP_TIMEOUT_FACTOR = 20.0  # × the variant's median step time
MIN_GRACE_S = 5.0
_KEEP_STEPS = 256


@dataclass
class CallWatch:
    """One running call: when it last made a step, and whether the watchdog gave up on it."""

    key: VariantKey
    job_ids: list[str]
    last_step: float = field(default_factory=time.monotonic)
    stalled: threading.Event = field(default_factory=threading.Event)
    stalled_at: float | None = None

    def stepped(self) -> None:
        self.last_step = time.monotonic()


class Watchdog:
    """Per-variant step timeouts from measured step times; checks the running calls."""

    def __init__(self, step_timeout_s: float | None, *, exit_process: Callable[[int], None] = os._exit) -> None:
        self.step_timeout_s = step_timeout_s
        self._exit = exit_process
        self._steps: dict[VariantKey, deque[float]] = {}
        self._calls: list[CallWatch] = []

    def record(self, key: VariantKey, step_seconds: list[float]) -> None:
        self._steps.setdefault(key, deque(maxlen=_KEEP_STEPS)).extend(step_seconds)

    def limit(self, key: VariantKey) -> float:
        """The configured timeout, else generous: 20 × the median measured step, never below 60 s."""
        if self.step_timeout_s is not None:
            return self.step_timeout_s
        steps = self._steps.get(key)
        median = statistics.median(steps) if steps else 0.0
        return max(MIN_STEP_TIMEOUT_S, STEP_TIMEOUT_FACTOR * median)

    def watch(self, key: VariantKey, job_ids: list[str]) -> CallWatch:
        call = CallWatch(key, list(job_ids))
        self._calls.append(call)
        return call

    def done(self, call: CallWatch) -> None:
        if call in self._calls:
            self._calls.remove(call)

    def check(self, now: float | None = None) -> None:
        """Mark calls without a step for their limit as stalled; exit when a stalled call did not stop."""
        now = time.monotonic() if now is None else now
        for call in list(self._calls):
            limit = self.limit(call.key)
            if call.stalled_at is None and now - call.last_step > limit:
                call.stalled_at = now
                call.stalled.set()
                logger.error(
                    "call for %s (jobs %s) made no denoising step for %.1f s (limit %.1f s): stalled; "
                    "it stops at its next step",
                    call.key,
                    ", ".join(call.job_ids),
                    now - call.last_step,
                    limit,
                )
            elif call.stalled_at is not None and now - call.stalled_at > max(MIN_GRACE_S, limit):
                logger.critical(
                    "stalled call for %s did not stop within %.1f s: it cannot be stopped from "
                    "Python; exiting with status %d so a supervisor restarts this worker and its jobs "
                    "are reclaimed",
                    call.key,
                    max(MIN_GRACE_S, limit),
                    STALLED_EXIT_CODE,
                )
                for handler in logging.getLogger().handlers:  # the last words reach the log
                    handler.flush()
                self._exit(STALLED_EXIT_CODE)
                return

    async def run(self, stopping: asyncio.Event) -> None:
        """Check a few times per second until ``stopping`` is set."""
        while not stopping.is_set():
            self.check()
            interval = min(1.0, max(0.05, (self.step_timeout_s or MIN_STEP_TIMEOUT_S) / 4))
            try:
                await asyncio.wait_for(stopping.wait(), timeout=interval)
            except asyncio.TimeoutError:
                continue
