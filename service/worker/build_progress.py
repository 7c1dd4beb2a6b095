"""Progress of one background build: phase, done / total, an ETA, and the log lines that carry them.

The build runs in its own thread; ``GET /models`` (through the worker's advertisement) and the build's log
lines read the same snapshot. Until the engine's calibration reports its own progress, work is counted in
denoiser calls, which a forward pre-hook on the denoiser sees: capture runs every prompt's full loop,
observation runs each recorded call once more, and evaluation runs the float and the quantized grid.
A hook that finds the build canceled (worker shutdown) raises :class:`BuildCanceled` at the next call.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import torch

from service.jobs.queue import BuildProgress
from service.registry import VariantKey

logger = logging.getLogger(__name__)


class BuildCanceled(Exception):
    """The worker is stopping; the build gives up at the next denoiser call (its lock is released)."""


class BuildTracker:
    """Thread-safe progress of one build, planned in denoiser calls per phase (see module doc)."""

    def __init__(self, key: VariantKey, *, log_every_s: float = 10.0) -> None:
        self.key = key
        self.started_at = time.time()
        self._log_every_s = log_every_s
        self._lock = threading.Lock()
        self._phase = "starting"
        self._done = 0
        self._total: int | None = None
        self._plan: dict[str, int] = {}
        self._finished_units = 0  # planned units of phases already over
        self._counted_s = 0.0  # seconds spent in planned phases already over
        self._phase_start = time.monotonic()
        self._last_log = 0.0
        self._canceled = threading.Event()

    # ------------------------------------------------------------------ writing (build thread)
    def plan(self, **units: int) -> None:
        """Expected denoiser calls per phase, e.g. ``plan(calibrating=120, evaluating=32)`` (for the ETA)."""
        with self._lock:
            self._plan = {k: max(0, v) for k, v in units.items()}

    def phase(self, name: str, total: int | None = None) -> None:
        with self._lock:
            if self._phase in self._plan:
                self._finished_units += self._plan[self._phase]
                self._counted_s += time.monotonic() - self._phase_start
            self._phase, self._done = name, 0
            self._total = total if total is not None else self._plan.get(name)
            self._phase_start = time.monotonic()
        self._log(force=True)

    def advance(self, n: int = 1) -> None:
        if self._canceled.is_set():
            raise BuildCanceled(f"build of {self.key} canceled")
        with self._lock:
            self._done += n
            if self._total is not None:
                self._done = min(self._done, self._total)
        self._log()

    def watch(self, module: torch.nn.Module) -> Any:
        """Count ``module``'s forward calls as progress; returns the hook handle (``.remove()`` it)."""
        return module.register_forward_pre_hook(lambda _m, _args: self.advance())

    def cancel(self) -> None:
        self._canceled.set()

    # ------------------------------------------------------------------ reading (any thread)
    def eta_s(self) -> float | None:
        """Remaining planned calls × the seconds per call measured so far in planned phases."""
        with self._lock:
            if self._phase not in self._plan:
                return None
            done_units = self._finished_units + self._done
            elapsed = self._counted_s + time.monotonic() - self._phase_start
            remaining = sum(self._plan.values()) - done_units
        if done_units <= 0 or elapsed <= 0:
            return None
        return round(max(0.0, remaining) * elapsed / done_units, 1)

    def snapshot(self) -> BuildProgress:
        eta = self.eta_s()
        with self._lock:
            return BuildProgress(
                phase=self._phase, done=self._done, total=self._total, eta_s=eta, started_at=self.started_at
            )

    def describe(self) -> str:
        s = self.snapshot()
        count = f" {s.done}/{s.total}" if s.total else (f" {s.done}" if s.done else "")
        eta = f", eta {s.eta_s:.0f}s" if s.eta_s is not None else ""
        return f"[{s.phase}{count}{eta}]"

    def _log(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_log < self._log_every_s:
            return
        self._last_log = now
        logger.info("build %s %s", self.key, self.describe())
