"""Which variants no live worker serves, and since when (as this process has seen it).

Jobs for a variant nobody serves would wait forever and hold that variant's share of the queue. The API
watches the workers' advertisements: once a variant has had no live worker for ``queue.unserved_timeout_s``
its queued jobs fail with reason ``unserved``, and new ones fail at once, until a worker serves it again.
The clock starts when this process first sees the variant unserved (an API restart waits the timeout again,
which gives workers that start with it time to advertise).
"""

from __future__ import annotations

from collections.abc import Iterable

from service.registry import VariantKey

UNSERVED_REASON = "unserved"


class UnservedWatch:
    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._since: dict[VariantKey, float] = {}

    def observe(self, keys: Iterable[VariantKey], served: set[str], now: float) -> None:
        """Record which of ``keys`` are served (``served`` holds ``model:variant`` strings) at ``now``."""
        for key in keys:
            if str(key) in served:
                self._since.pop(key, None)
            else:
                self._since.setdefault(key, now)

    def overdue(self, key: VariantKey, now: float) -> float | None:
        """Seconds the variant has been unserved, when that reaches the timeout; else None."""
        since = self._since.get(key)
        if since is None or now - since < self.timeout_s:
            return None
        return now - since

    def message(self, key: VariantKey, now: float) -> str:
        return (
            f"no live worker serves variant {key} (none for {now - self._since.get(key, now):.0f} s; "
            f"queue.unserved_timeout_s = {self.timeout_s:g})"
        )
