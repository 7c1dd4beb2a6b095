"""Background builds: one build task per variant, out of the request path.

A build (calibration, artifact, fidelity) takes minutes on our models and hours at real sizes, so it never
runs inside a generation job. The runner asks for one when a job finds its variant unbuilt or when
``POST /models/{model}/variants/{variant}/build`` was called; the build runs in a daemon thread of its own
(the worker keeps serving every other variant, and a stopping worker does not wait for it), and the jobs
that wait for it stay in the queue. Nothing ties a build to the job that triggered it: canceling that job,
or its client going away, leaves the build running.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable

from service.build_requests import BuildRequests
from service.registry import VariantKey
from service.worker.build_progress import BuildCanceled, BuildTracker
from service.worker.engine import BuildOutcome, Engine

logger = logging.getLogger(__name__)

OnBuildDone = Callable[[VariantKey, BuildOutcome | None, BaseException | None], Awaitable[None]]


class BuildManager:
    """Starts builds (at most one per variant on this worker), polls build requests, stops with the worker."""

    def __init__(self, engine: Engine, requests: BuildRequests, on_done: OnBuildDone) -> None:
        self.engine, self.requests, self.on_done = engine, requests, on_done
        self._tasks: dict[VariantKey, asyncio.Task[None]] = {}
        self._trackers: dict[VariantKey, BuildTracker] = {}

    def active(self, key: VariantKey) -> bool:
        return key in self._tasks

    def start(self, key: VariantKey, why: str) -> bool:
        """Start building ``key`` in the background; False when a build of it is already running here."""
        if key in self._tasks:
            return False
        tracker = BuildTracker(key)
        self._trackers[key] = tracker
        self._tasks[key] = asyncio.create_task(self._run(key, tracker), name=f"segquant-build-{key}")
        logger.info("starting a background build of %s (%s)", key, why)
        return True

    async def _run(self, key: VariantKey, tracker: BuildTracker) -> None:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[BuildOutcome] = loop.create_future()

        def target() -> None:
            try:
                outcome = self.engine.build(key, tracker)
            except BaseException as e:  # handed to the event loop, which logs and reports it
                loop.call_soon_threadsafe(_settle, done, None, e)
            else:
                loop.call_soon_threadsafe(_settle, done, outcome, None)

        threading.Thread(target=target, name=f"segquant-build-{key}", daemon=True).start()
        outcome: BuildOutcome | None = None
        error: BaseException | None = None
        try:
            outcome = await asyncio.shield(done)
        except asyncio.CancelledError:
            tracker.cancel()
            raise
        except BuildCanceled as e:
            error = e
        except Exception as e:  # the engine logged it with its traceback; jobs get the reason
            error = e
        finally:
            self._tasks.pop(key, None)
            self._trackers.pop(key, None)
        try:
            await self.on_done(key, outcome, error)
        except Exception:
            logger.exception("after the build of %s: reporting its outcome failed", key)

    async def poll_requests(self, keys: list[VariantKey]) -> None:
        """Start builds asked for through the API (variants already built just have their request cleared)."""
        for key in await self.requests.pending(keys):
            if key in self._tasks:
                continue
            if self.engine.is_built(key) and self.engine.build_error(key) is None:
                await self.requests.clear(key)
                continue
            self.start(key, "requested through the API")

    async def stop(self, timeout_s: float = 5.0) -> None:
        """Cancel running builds (they stop at their next denoiser call) and wait a little for them."""
        tasks = list(self._tasks.values())
        for tracker in self._trackers.values():
            tracker.cancel()
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=timeout_s)


def _settle(future: asyncio.Future[BuildOutcome], outcome: BuildOutcome | None, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        assert outcome is not None
        future.set_result(outcome)
