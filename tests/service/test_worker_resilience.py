"""The worker's error policy: only connection errors are retried (by type, with capped backoff), other errors
propagate; every swallowed error is logged once per place and type."""

from __future__ import annotations

import asyncio
import logging

import pytest
import redis.exceptions

from service.jobs.queue import QueueUnavailableError
from service.worker.resilience import Backoff, SwallowedErrors, is_connection_error, retry_connection


def test_connection_errors_are_known_by_type_not_by_message() -> None:
    assert is_connection_error(redis.exceptions.ConnectionError("Error 111 connecting"))
    assert is_connection_error(redis.exceptions.TimeoutError("timed out"))
    assert is_connection_error(QueueUnavailableError("down")) and is_connection_error(ConnectionRefusedError())
    assert not is_connection_error(RuntimeError("could not connect the dots"))  # the old message search said yes
    assert not is_connection_error(redis.exceptions.ResponseError("NOSCRIPT"))


def test_backoff_doubles_up_to_its_cap_and_resets() -> None:
    b = Backoff(first=0.5, cap=3.0)
    assert [b.next() for _ in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    b.reset()
    assert b.next() == 0.5


async def test_retry_connection_retries_outages_and_lets_bugs_through() -> None:
    calls = {"n": 0}

    async def flaky() -> str:
        calls["n"] += 1
        if calls["n"] < 3:
            raise redis.exceptions.ConnectionError("connection refused")
        return "ok"

    stopping = asyncio.Event()
    assert await retry_connection(flaky, stopping=stopping, what="t", backoff=Backoff(0.01, 0.02)) == "ok"
    assert calls["n"] == 3

    async def buggy() -> str:
        raise KeyError("state")

    with pytest.raises(KeyError):
        await retry_connection(buggy, stopping=stopping, what="t", backoff=Backoff(0.01, 0.02))
    stopping.set()

    async def down() -> str:
        raise QueueUnavailableError("down")

    with pytest.raises(QueueUnavailableError):  # a stopping worker gives up instead of waiting for Redis
        await retry_connection(down, stopping=stopping, what="t")


def test_swallowed_errors_are_logged_once_per_place_and_type(caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("test.swallowed")
    errors = SwallowedErrors(log)
    caplog.set_level(logging.DEBUG, logger="test.swallowed")
    for _ in range(3):
        with errors.swallow("advertising"):
            raise redis.exceptions.ConnectionError("down")
    with errors.swallow("publishing progress"):
        raise ValueError("bad")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and "advertising failed (ConnectionError: down)" in warnings[0]
    assert errors.counts[("advertising", "ConnectionError")] == 3
    with errors.swallow("nothing"):
        pass
    assert ("nothing", "ValueError") not in errors.counts
