"""How the worker treats errors around the queue: retry only connection errors (by type, capped backoff), and
log every error it chooses to swallow — once per place and type, so an outage does not flood the log.

A bug (a ``KeyError`` in a Lua reply, a schema mismatch) must not be retried forever as if Redis were away:
only errors that mean "the queue cannot be reached" are retried; anything else propagates to the caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterator
from typing import TypeVar

import redis.exceptions

from service.jobs.queue import QueueUnavailableError

logger = logging.getLogger(__name__)

T = TypeVar("T")

CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    QueueUnavailableError,
    redis.exceptions.ConnectionError,  # includes redis' own TimeoutError subclasses of it
    redis.exceptions.TimeoutError,
    ConnectionError,  # builtin: refused, reset, aborted
    TimeoutError,
)


def is_connection_error(exc: BaseException) -> bool:
    """Whether ``exc`` means the queue backend cannot be reached (decided by type, never by message)."""
    return isinstance(exc, CONNECTION_ERRORS)


class Backoff:
    """Capped exponential delays: 0.5, 1, 2, … up to ``cap`` seconds; :meth:`reset` after a success."""

    def __init__(self, first: float = 0.5, cap: float = 10.0) -> None:
        self.first, self.cap = first, cap
        self._next = first

    def next(self) -> float:
        delay, self._next = self._next, min(self._next * 2, self.cap)
        return delay

    def reset(self) -> None:
        self._next = self.first


async def retry_connection(
    fn: Callable[[], Awaitable[T]], *, stopping: asyncio.Event, what: str, backoff: Backoff | None = None
) -> T:
    """``await fn()``, retried with capped backoff while the queue is unreachable (other errors propagate).

    Gives up (re-raising) once ``stopping`` is set, so a draining worker does not wait for Redis forever.
    """
    backoff = backoff or Backoff()
    while True:
        try:
            return await fn()
        except CONNECTION_ERRORS as e:
            if stopping.is_set():
                raise
            delay = backoff.next()
            logger.warning("%s: queue unavailable (%s: %s); retrying in %.1fs", what, type(e).__name__, e, delay)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stopping.wait(), timeout=delay)


class SwallowedErrors:
    """Logs each swallowed error: the first of each (place, type) as a warning, repeats at debug level."""

    def __init__(self, log: logging.Logger = logger) -> None:
        self.log = log
        self.counts: dict[tuple[str, str], int] = {}

    def record(self, where: str, exc: BaseException) -> None:
        key = (where, type(exc).__name__)
        self.counts[key] = self.counts.get(key, 0) + 1
        if self.counts[key] == 1:
            self.log.warning(
                "%s failed (%s: %s); carrying on (repeats are logged at debug level)", where, type(exc).__name__, exc
            )
        else:
            self.log.debug("%s failed again (%s: %s; %d times)", where, type(exc).__name__, exc, self.counts[key])

    @contextlib.contextmanager
    def swallow(self, where: str) -> Iterator[None]:
        """Run a best-effort block (an advertisement, a progress write): its failure is logged, not raised."""
        try:
            yield
        except Exception as e:  # best effort by design; recorded above
            self.record(where, e)
