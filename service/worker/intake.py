"""Reading and reclaiming deliveries: which streams a worker reads, in which order, and how a batch fills up.

Variants already in memory are read first (a worker does not swap models while it has work for one); a
variant whose artifact is being built here is not read at all (its jobs wait in the queue). Every so often
the worker first reclaims the entries of dead or stalled workers. When a delivery arrives, the worker waits
up to ``batch_wait_ms`` for more compatible ones of the same variant.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from service.jobs.queue import Delivery, WorkerQueue
from service.registry import VariantKey
from service.settings import Settings

logger = logging.getLogger(__name__)


class Intake:
    """The read side of one worker: ``next()`` returns the next deliveries to admit (possibly none)."""

    def __init__(
        self,
        queue: WorkerQueue,
        settings: Settings,
        keys: list[VariantKey],
        worker_id: str,
        *,
        loaded: Callable[[], list[VariantKey]],
        building: Callable[[VariantKey], bool],
        stopping: asyncio.Event,
    ) -> None:
        self.queue, self.settings, self.keys, self.worker_id = queue, settings, keys, worker_id
        self._loaded, self._building, self._stopping = loaded, building, stopping
        self._next_reclaim = 0.0

    def ordered_keys(self) -> list[VariantKey]:
        """Variants already in memory first; variants being built here left out (their jobs stay queued)."""
        loaded = set(self._loaded())
        return sorted([k for k in self.keys if not self._building(k)], key=lambda k: k not in loaded)

    async def next(self) -> list[Delivery]:
        q, w = self.settings.queue, self.settings.worker
        now = time.monotonic()
        if now >= self._next_reclaim:
            self._next_reclaim = now + max(q.reclaim_idle_s / 2, q.heartbeat_interval_s)
            reclaimed = await self.queue.reclaim(self.keys, self.worker_id, q.reclaim_idle_s, w.max_batch_size)
            if reclaimed:
                logger.info("reclaimed %d job(s) from dead or stalled workers", len(reclaimed))
                return reclaimed
        got: list[Delivery] = []
        keys = self.ordered_keys()
        for key in keys:
            got = await self.queue.read([key], self.worker_id, w.max_batch_size, 0)
            if got:
                break
        if not got:
            block = min(1.0, q.reclaim_idle_s / 2)
            if not keys:  # every served variant is building: nothing to read yet
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), timeout=block)
                return []
            got = await self.queue.read(keys, self.worker_id, 1, int(block * 1000))
        return await self._fill(got) if got else got

    async def _fill(self, got: list[Delivery]) -> list[Delivery]:
        """Wait up to ``batch_wait_ms`` for more deliveries of the same variant (they may share one call)."""
        w = self.settings.worker
        if w.batch_wait_ms <= 0 or len(got) >= w.max_batch_size:
            return got
        deadline = time.monotonic() + w.batch_wait_ms / 1000
        while len(got) < w.max_batch_size and (left := deadline - time.monotonic()) > 0:
            more = await self.queue.read(
                [got[0].key], self.worker_id, w.max_batch_size - len(got), max(1, int(left * 1000))
            )
            if not more:
                break
            got += more
        return got
