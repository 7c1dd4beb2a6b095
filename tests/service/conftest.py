"""Fixtures for the service tests: a real Redis and a unique key prefix per test.

Tests use the Redis on 127.0.0.1:6379 (or start their own ``redis-server`` when none listens there), each
with a unique key prefix, and delete only their own keys.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator

import pytest
import redis

from tests.service.helpers import DEFAULT_REDIS, RedisServer, reachable


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    if reachable(DEFAULT_REDIS):
        yield DEFAULT_REDIS
        return
    server = RedisServer().start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def key_prefix(redis_url: str) -> Iterator[str]:
    """A unique prefix; every key under it is deleted afterwards (and only those)."""
    prefix = f"sqtest-{uuid.uuid4().hex[:10]}"
    yield prefix
    client = redis.Redis.from_url(redis_url)
    with contextlib.suppress(redis.RedisError):
        keys = list(client.scan_iter(match=f"{prefix}:*", count=500))
        if keys:
            client.delete(*keys)
