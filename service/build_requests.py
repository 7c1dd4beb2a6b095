"""Build requests: how ``POST /models/{model}/variants/{variant}/build`` reaches the workers.

The API records a request per variant; every worker that serves the variant polls for requests and starts
a background build (the artifact's file lock makes sure only one of them builds; the others wait for it and
find the artifact there). The worker that finishes a build clears the request. With Redis the request is one
key, ``{prefix}:build:{model}:{variant}`` (its value: when it was asked for); in embedded mode it is a set
shared by the API and the in-process worker through the queue object they share.
"""

from __future__ import annotations

import time
import weakref
from typing import Any, Protocol

from service.jobs.queue import QueueUnavailableError
from service.registry import VariantKey


class BuildRequests(Protocol):
    async def request(self, key: VariantKey) -> None: ...

    async def pending(self, keys: list[VariantKey]) -> set[VariantKey]: ...

    async def clear(self, key: VariantKey) -> None: ...


class LocalBuildRequests:
    """In-process requests (embedded mode)."""

    def __init__(self) -> None:
        self._asked: dict[VariantKey, float] = {}

    async def request(self, key: VariantKey) -> None:
        self._asked.setdefault(key, time.time())

    async def pending(self, keys: list[VariantKey]) -> set[VariantKey]:
        return {k for k in keys if k in self._asked}

    async def clear(self, key: VariantKey) -> None:
        self._asked.pop(key, None)


class RedisBuildRequests:
    """Requests as Redis keys next to the queue's (same connection pool, same prefix)."""

    def __init__(self, client: Any, prefix: str) -> None:
        self.client, self.prefix = client, prefix

    def _key(self, key: VariantKey) -> str:
        return f"{self.prefix}:build:{key.model}:{key.variant}"

    async def request(self, key: VariantKey) -> None:
        import redis

        try:
            await self.client.set(self._key(key), str(time.time()), nx=True)
        except (redis.ConnectionError, redis.TimeoutError) as e:
            raise QueueUnavailableError(str(e)) from e

    async def pending(self, keys: list[VariantKey]) -> set[VariantKey]:
        if not keys:
            return set()
        values = await self.client.mget([self._key(k) for k in keys])
        return {k for k, v in zip(keys, values) if v is not None}

    async def clear(self, key: VariantKey) -> None:
        await self.client.delete(self._key(key))


_local: weakref.WeakKeyDictionary[Any, LocalBuildRequests] = weakref.WeakKeyDictionary()


def build_requests_for(queue: Any) -> BuildRequests:
    """The build-request channel that goes with ``queue`` (the same object for API and embedded worker)."""
    client, prefix = getattr(queue, "redis", None), getattr(getattr(queue, "keys", None), "prefix", None)
    if client is not None and isinstance(prefix, str):
        return RedisBuildRequests(client, prefix)
    found = _local.get(queue)
    if found is None:
        found = _local[queue] = LocalBuildRequests()
    return found
