"""One running pipeline call, seen from both sides: the loop (cancel flags, hand-back, the watchdog) and the
call's thread (the step callback), plus publishing its steps to the queue in order.

The step callback runs in the pipeline thread after every denoising step: it reports the step to the
watchdog, hands ``(step, total)`` to the event loop, applies the test-only debug hooks, and stops the call
(:class:`StopBatch`) when it stalled, must be handed back, or all its jobs were canceled.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from service.jobs.queue import WorkerQueue
from service.worker.engine import StopBatch
from service.worker.resilience import SwallowedErrors
from service.worker.watchdog import CallWatch

logger = logging.getLogger(__name__)

CRASH_EXIT_CODE = 86  # debug hook crash_worker
Steps = asyncio.Queue[tuple[int, int] | None]


@dataclass
class CallControl:
    """Shared between the loop and one pipeline call's thread."""

    job_ids: list[str]
    watch: CallWatch
    crash: bool = False
    hang: bool = False
    step_delay_s: float = 0.0
    canceled: set[str] = field(default_factory=set)
    handback: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def all_canceled(self) -> bool:
        with self.lock:
            return set(self.job_ids) <= self.canceled


def step_callback(control: CallControl, loop: asyncio.AbstractEventLoop, steps: Steps) -> Callable[[int, int], None]:
    """The callback the engine runs after each denoising step (in the pipeline thread)."""

    def on_step(step: int, total: int) -> None:
        if control.hang:  # debug hook: a call that cannot be stopped (the watchdog makes the worker exit)
            logger.critical("debug hook hang_first_attempt: this call hangs now")
            time.sleep(3600)
        control.watch.stepped()
        if control.crash:
            logger.critical("debug hook crash_worker: exiting the worker process now")
            os._exit(CRASH_EXIT_CODE)
        loop.call_soon_threadsafe(steps.put_nowait, (step, total))
        if control.step_delay_s:
            time.sleep(control.step_delay_s)
        if control.watch.stalled.is_set():
            raise StopBatch(stalled=True)
        if control.handback.is_set():
            raise StopBatch(handback=True)
        if control.all_canceled():
            raise StopBatch()

    return on_step


async def publish_progress(queue: WorkerQueue, steps: Steps, control: CallControl, errors: SwallowedErrors) -> None:
    """Publish steps in order, one writer per call (a later step never overtakes an earlier one), until None."""
    while (item := await steps.get()) is not None:
        step, total = item
        for job_id in control.job_ids:
            with errors.swallow("publishing progress"):
                await queue.progress(job_id, step, total)
