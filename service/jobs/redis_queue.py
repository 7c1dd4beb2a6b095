"""The Redis Streams queue: one stream per model×variant, one consumer group, job hashes, event streams.

Delivery is at least once: an entry stays in the group's pending list until the worker acknowledges it
after writing the result. A worker heartbeat resets the idle time of the entries it holds; entries idle for
longer than ``reclaim_idle_s`` belong to a dead worker and are taken over with XAUTOCLAIM. Every state change
is a Lua check-and-set (:mod:`service.jobs.redis_scripts`), so a result is written once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from service.jobs import redis_scripts as lua
from service.jobs.constants import GROUP, STATS_KEEP, Keys
from service.jobs.model import Job, JobError, JobEvent, JobResult, JobState, Progress
from service.jobs.queue import (
    Delivery,
    IdempotencyConflictError,
    QueueFullError,
    QueueUnavailableError,
    StartOutcome,
    StatsRecord,
    Submission,
    WorkerInfo,
    expire_if_late,
)
from service.registry import VariantKey

logger = logging.getLogger(__name__)

BACKEND_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError)
# XAUTOCLAIM calls per stream in one reclaim round (each scans at most 10 × COUNT pending entries); a longer
# pending list is scanned on across rounds from the kept cursor.
RECLAIM_CALLS_PER_ROUND = 256


@contextlib.contextmanager
def _backend() -> Iterator[None]:
    """Turn connection failures into QueueUnavailableError (the API answers 503)."""
    try:
        yield
    except BACKEND_ERRORS as e:
        raise QueueUnavailableError(f"Redis is unreachable: {e}") from e


_STREAM_ID = re.compile(r"[0-9]{1,20}(-[0-9]{1,20})?")
_U64 = 2**64


def _stream_id(text: str) -> tuple[int, int]:
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


class RedisQueue:
    """Implements both :class:`~service.jobs.queue.JobQueue` and :class:`~service.jobs.queue.WorkerQueue`."""

    def __init__(
        self, url: str, *, prefix: str, result_ttl_s: int, idempotency_ttl_s: int = 86400, stream_maxlen: int = 100_000
    ) -> None:
        # Retry connection errors a few times: after a Redis restart, pooled connections are stale and the first
        # command on each fails. The scripts tolerate a replay (submit is keyed by job id; finish is check-and-set).
        self.redis = aioredis.from_url(
            url,
            decode_responses=True,
            socket_connect_timeout=2.0,
            health_check_interval=15,
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 3),
        )
        self.keys = Keys(prefix)
        self.result_ttl_s = result_ttl_s
        self.idempotency_ttl_s = idempotency_ttl_s
        self.stream_maxlen = stream_maxlen
        self._submit = self.redis.register_script(lua.SUBMIT)
        self._start = self.redis.register_script(lua.START)
        self._finish = self.redis.register_script(lua.FINISH)
        self._cancel = self.redis.register_script(lua.CANCEL)
        self._release = self.redis.register_script(lua.RELEASE)
        self._refresh = self.redis.register_script(lua.REFRESH)
        self._dead_letter = self.redis.register_script(lua.DEAD_LETTER)
        self._fail_queued = self.redis.register_script(lua.FAIL_QUEUED)
        self._streams: dict[str, VariantKey] = {}
        self._reclaim_cursor: dict[str, str] = {}  # stream → where the last XAUTOCLAIM scan stopped

    # ------------------------------------------------------------------ shared
    async def ping(self) -> None:
        with _backend():
            await self.redis.ping()

    async def close(self) -> None:
        await self.redis.aclose()

    def _key(self, key: VariantKey) -> str:
        name = self.keys.stream(key)
        self._streams[name] = key
        return name

    def _job_keys(self, job_id: str, key: VariantKey) -> list[str]:
        return [self.keys.job(job_id), self.keys.events(job_id), self.keys.queued_total(), self.keys.queued(key)]

    async def _variant_of(self, job_id: str) -> VariantKey | None:
        model, variant = await self.redis.hmget(self.keys.job(job_id), ["model", "variant"])
        return VariantKey(model, variant) if model and variant else None

    # ------------------------------------------------------------------ API side
    async def submit(
        self,
        job: Job,
        *,
        capacity: int,
        variant_capacity: int | None = None,
        idempotency_key: str | None = None,
        request_hash: str = "",
    ) -> Submission:
        key = VariantKey(job.params.model, job.params.variant)
        static = job.model_dump_json(include={"id", "params", "created_at", "deadline_at"})
        idem = self.keys.idempotency(idempotency_key) if idempotency_key else self.keys.idempotency("-")
        with _backend():
            out = await self._submit(
                keys=[
                    self.keys.job(job.id),
                    self._key(key),
                    self.keys.events(job.id),
                    self.keys.queued_total(),
                    self.keys.queued(key),
                    idem,
                ],
                args=[
                    job.id,
                    static,
                    capacity,
                    repr(job.created_at),
                    "" if job.deadline_at is None else repr(job.deadline_at),
                    self.stream_maxlen,
                    "1" if idempotency_key else "0",
                    request_hash,
                    self.idempotency_ttl_s,
                    key.model,
                    key.variant,
                    self.keys.job(""),
                    "" if variant_capacity is None else variant_capacity,
                ],
            )
        if out[0] == "full":
            if out[2] == "variant":
                assert variant_capacity is not None
                raise QueueFullError(int(out[1]), variant_capacity, str(key))
            raise QueueFullError(int(out[1]), capacity)
        if out[0] == "exists":
            if out[2] != request_hash:
                raise IdempotencyConflictError(out[1])
            existing = await self.get(out[1])
            if existing is not None:
                return Submission(existing, created=False)
        created = await self.get(job.id)
        return Submission(created or job, created=True)

    async def fail_queued(self, key: VariantKey, error: JobError) -> list[str]:
        stream, failed, error_json = self._key(key), [], error.model_dump_json()
        with _backend():
            start = "-"
            while True:
                page = await self.redis.xrange(stream, min=start, max="+", count=500)
                for _entry_id, fields in page:
                    job_id = fields.get("job_id")
                    if job_id and await self._fail_queued(
                        keys=self._job_keys(job_id, key), args=[repr(time.time()), error_json, self.result_ttl_s]
                    ):
                        failed.append(job_id)
                if len(page) < 500:
                    return failed
                start = f"({page[-1][0]}"

    async def get(self, job_id: str) -> Job | None:
        with _backend():
            h = await self.redis.hgetall(self.keys.job(job_id))
        return _job_from_hash(h) if h.get("job") else None

    async def cancel(self, job_id: str) -> tuple[Job | None, str]:
        with _backend():
            key = await self._variant_of(job_id)
            if key is None:
                return None, "missing"
            out = await self._cancel(
                keys=[*self._job_keys(job_id, key), self._key(key)], args=[repr(time.time()), self.result_ttl_s]
            )
        return await self.get(job_id), out[0]

    async def expire_if_late(self, job: Job, now: float) -> Job:
        return await expire_if_late(self, job, now)

    async def events(self, job_id: str, after: str | None = None) -> AsyncIterator[JobEvent]:
        last = after or "0-0"
        events_key = self.keys.events(job_id)
        while True:
            with _backend():
                resp = await self.redis.xread({events_key: last}, count=100, block=5000)
            if not resp:
                with _backend():
                    if not await self.redis.exists(self.keys.job(job_id)):
                        return
                continue
            for entry_id, fields in resp[0][1]:
                last = entry_id
                event = JobEvent(id=entry_id, type=fields.get("type", ""), data=json.loads(fields.get("data") or "{}"))
                yield event
                if event.terminal:
                    return

    def valid_event_id(self, text: str) -> bool:
        """A stream id ``ms[-seq]`` with both parts below 2^64 (XREAD refuses anything else mid-stream)."""
        if not _STREAM_ID.fullmatch(text):
            return False
        ms, seq = _stream_id(text)
        return ms < _U64 and seq < _U64

    async def wait(self, job_id: str, timeout: float) -> Job | None:
        deadline = time.monotonic() + timeout
        last = "0-0"
        events_key = self.keys.events(job_id)
        while True:
            job = await self.get(job_id)
            if job is None or job.state.terminal:
                return job
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return job
            with _backend():
                resp = await self.redis.xread(
                    {events_key: last}, count=100, block=max(1, int(min(remaining, 5.0) * 1000))
                )
            for entry_id, _fields in resp[0][1] if resp else []:
                last = entry_id

    async def position(self, job: Job) -> int | None:
        if job.state is not JobState.QUEUED:
            return None
        stream = self._key(VariantKey(job.params.model, job.params.variant))
        with _backend():
            entry = await self.redis.hget(self.keys.job(job.id), "entry_id")
            if not entry:
                return None
            last = "0-0"
            with contextlib.suppress(ResponseError):
                for group in await self.redis.xinfo_groups(stream):
                    if group["name"] == GROUP:
                        last = group["last-delivered-id"]
            if _stream_id(entry) <= _stream_id(last):
                return 0  # delivered to a worker, about to start
            ahead = await self.redis.xrange(stream, min=f"({last}", max=entry, count=10_000)
        return len(ahead)

    async def depths(self, keys: list[VariantKey]) -> dict[VariantKey, int]:
        if not keys:
            return {}
        with _backend():
            values = await self.redis.mget([self.keys.queued(k) for k in keys])
        return {k: max(0, int(v or 0)) for k, v in zip(keys, values)}

    async def total_depth(self) -> int:
        with _backend():
            return max(0, int(await self.redis.get(self.keys.queued_total()) or 0))

    async def stats(self, key: VariantKey) -> list[StatsRecord]:
        with _backend():
            rows = await self.redis.lrange(self.keys.stats(key), 0, -1)
        return [StatsRecord.model_validate_json(r) for r in rows]

    async def workers(self) -> list[WorkerInfo]:
        with _backend():
            ids = await self.redis.zrange(self.keys.workers(), 0, -1)
            if not ids:
                return []
            values = await self.redis.mget([self.keys.worker(i) for i in ids])
            gone = [i for i, v in zip(ids, values) if v is None]
            if gone:
                await self.redis.zrem(self.keys.workers(), *gone)
        return [WorkerInfo.model_validate_json(v) for v in values if v is not None]

    async def dead_letters(self, count: int = 100) -> list[dict[str, Any]]:
        with _backend():
            rows = await self.redis.xrevrange(self.keys.dlq(), count=count)
        return [{"entry_id": i, **fields} for i, fields in rows]

    # ------------------------------------------------------------------ worker side
    async def prepare(self, keys: list[VariantKey]) -> None:
        for key in keys:
            try:
                await self.redis.xgroup_create(self._key(key), GROUP, id="0", mkstream=True)
            except ResponseError as e:
                if "BUSYGROUP" not in str(e):
                    raise

    async def advertise(self, info: WorkerInfo, ttl_s: float) -> None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.set(self.keys.worker(info.id), info.model_dump_json(), px=int(ttl_s * 1000))
        pipe.zadd(self.keys.workers(), {info.id: time.time()})
        await pipe.execute()

    async def withdraw(self, worker_id: str) -> None:
        await self.redis.delete(self.keys.worker(worker_id))
        await self.redis.zrem(self.keys.workers(), worker_id)

    def _deliveries(self, resp: list[Any]) -> list[Delivery]:
        out: list[Delivery] = []
        for stream, entries in resp or []:
            key = self._streams[stream]
            out += [Delivery(fields["job_id"], key, entry_id) for entry_id, fields in entries if fields]
        return out

    async def read(self, keys: list[VariantKey], consumer: str, count: int, block_ms: int) -> list[Delivery]:
        streams = {self._key(k): ">" for k in keys}
        try:
            resp = await self.redis.xreadgroup(
                GROUP, consumer, streams, count=count, block=block_ms if block_ms > 0 else None
            )
        except ResponseError as e:
            if "NOGROUP" not in str(e):
                raise
            await self.prepare(keys)  # Redis lost its data (restart without persistence): recreate
            return []
        return self._deliveries(resp)

    async def reclaim(self, keys: list[VariantKey], consumer: str, min_idle_s: float, count: int) -> list[Delivery]:
        """Take over up to ``count`` entries idle for ``min_idle_s``, scanning each stream's whole pending list.

        XAUTOCLAIM looks at no more than ``10 × COUNT`` pending entries per call, so one call from ``0-0``
        never reaches a dead worker's entry behind many live ones. Each stream keeps the cursor where its last
        scan stopped; a round follows it until the scan wraps (cursor ``0-0``) or ``count`` entries are taken.
        """
        out: list[Delivery] = []
        for key in keys:
            if len(out) >= count:
                break
            stream = self._key(key)
            try:
                out += await self._reclaim_stream(stream, key, consumer, int(min_idle_s * 1000), count - len(out))
            except ResponseError as e:
                if "NOGROUP" not in str(e):
                    raise
                self._reclaim_cursor.pop(stream, None)
                await self.prepare([key])
        return out

    async def _reclaim_stream(
        self, stream: str, key: VariantKey, consumer: str, min_idle_ms: int, count: int
    ) -> list[Delivery]:
        out: list[Delivery] = []
        cursor = self._reclaim_cursor.get(stream, "0-0")
        for _ in range(RECLAIM_CALLS_PER_ROUND):
            cursor, entries, *_deleted = await self.redis.xautoclaim(
                stream, GROUP, consumer, min_idle_ms, cursor, count=count - len(out)
            )
            claimed = [(entry_id, fields["job_id"]) for entry_id, fields in entries if fields]
            counts = await self._delivery_counts(stream, consumer, [entry_id for entry_id, _ in claimed])
            out += [Delivery(job_id, key, entry_id, counts.get(entry_id, 1)) for entry_id, job_id in claimed]
            if cursor == "0-0" or len(out) >= count:
                break
        self._reclaim_cursor[stream] = cursor
        return out

    async def _delivery_counts(self, stream: str, consumer: str, entry_ids: list[str]) -> dict[str, int]:
        """Delivery counts of entries this consumer holds, from XPENDING over their id range (not one call each)."""
        if not entry_ids:
            return {}
        wanted = set(entry_ids)
        counts: dict[str, int] = {}
        start, end = min(entry_ids, key=_stream_id), max(entry_ids, key=_stream_id)
        while True:  # the consumer may hold other entries in the range too: page until every id is seen
            page = await self.redis.xpending_range(
                stream, GROUP, min=start, max=end, count=len(entry_ids) + 64, consumername=consumer
            )
            counts |= {p["message_id"]: int(p["times_delivered"]) for p in page if p["message_id"] in wanted}
            if len(page) < len(entry_ids) + 64 or wanted <= counts.keys():
                return counts
            start = f"({page[-1]['message_id']}"

    async def refresh(self, deliveries: list[Delivery], consumer: str) -> set[str]:
        by_stream: dict[str, list[str]] = {}
        for d in deliveries:
            by_stream.setdefault(self._key(d.key), []).append(d.entry_id)
        lost: set[str] = set()
        for stream, ids in by_stream.items():
            lost.update(await self._refresh(keys=[stream], args=[GROUP, consumer, *ids]))
        return lost

    async def start(self, delivery: Delivery, worker_id: str) -> StartOutcome:
        out = await self._start(
            keys=self._job_keys(delivery.job_id, delivery.key),
            args=[worker_id, repr(time.time()), delivery.entry_id, self.result_ttl_s],
        )
        job = await self.get(delivery.job_id)
        return StartOutcome(out[0], job)

    async def progress(self, job_id: str, step: int, total: int) -> None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(
            self.keys.job(job_id),
            mapping={"progress_step": step, "progress_total": total, "heartbeat_at": repr(time.time())},
        )
        pipe.xadd(
            self.keys.events(job_id),
            {"type": "progress", "data": json.dumps({"step": step, "total": total})},
            maxlen=1000,
            approximate=True,
        )
        await pipe.execute()

    async def cancel_requested(self, job_ids: list[str]) -> set[str]:
        if not job_ids:
            return set()
        pipe = self.redis.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hget(self.keys.job(job_id), "cancel_requested")
        flags = await pipe.execute()
        return {j for j, f in zip(job_ids, flags) if f == "1"}

    async def finish(
        self,
        job_id: str,
        state: JobState,
        *,
        result: JobResult | None = None,
        error: JobError | None = None,
        worker_id: str | None = None,
    ) -> bool:
        key = await self._variant_of(job_id)
        if key is None:
            return False
        written = await self._finish(
            keys=self._job_keys(job_id, key),
            args=[
                state.value,
                repr(time.time()),
                result.model_dump_json() if result else "",
                error.model_dump_json() if error else "",
                self.result_ttl_s,
                worker_id or "",
            ],
        )
        return bool(written)

    async def ack(self, delivery: Delivery) -> None:
        await self.redis.xack(self._key(delivery.key), GROUP, delivery.entry_id)

    async def release(self, delivery: Delivery, worker_id: str) -> str:
        key = delivery.key
        out = await self._release(
            keys=[
                self.keys.job(delivery.job_id),
                self._key(key),
                self.keys.events(delivery.job_id),
                self.keys.queued_total(),
                self.keys.queued(key),
            ],
            args=[worker_id, delivery.entry_id, self.stream_maxlen, delivery.job_id],
        )
        if out[0] != "not_owner":  # another worker took the job over: its pending entry is not ours to ack
            await self.ack(delivery)
        return str(out[0])

    async def dead_letter(self, delivery: Delivery, message: str) -> bool:
        """Record the entry in the dead-letter stream, fail the job and acknowledge the entry, in one script."""
        key = delivery.key
        error = JobError(reason="worker_lost", message=message).model_dump_json()
        written = await self._dead_letter(
            keys=[*self._job_keys(delivery.job_id, key), self._key(key), self.keys.dlq()],
            args=[
                GROUP,
                delivery.entry_id,
                delivery.job_id,
                key.model,
                key.variant,
                delivery.deliveries,
                message,
                repr(time.time()),
                error,
                self.result_ttl_s,
                self.stream_maxlen,
            ],
        )
        return bool(written)

    async def record_stats(self, key: VariantKey, records: list[StatsRecord]) -> None:
        if not records:
            return
        pipe = self.redis.pipeline(transaction=False)
        pipe.lpush(self.keys.stats(key), *[r.model_dump_json() for r in records])
        pipe.ltrim(self.keys.stats(key), 0, STATS_KEEP - 1)
        await pipe.execute()

    async def forget_consumer(self, keys: list[VariantKey], consumer: str) -> None:
        """Drop this worker's consumer from the groups once it holds nothing (keeps XINFO tidy)."""
        for key in keys:
            stream = self._key(key)
            with contextlib.suppress(ResponseError):
                for c in await self.redis.xinfo_consumers(stream, GROUP):
                    if c["name"] == consumer and int(c["pending"]) == 0:
                        await self.redis.xgroup_delconsumer(stream, GROUP, consumer)


def _job_from_hash(h: dict[str, str]) -> Job:
    """Rebuild the public job from its hash (static JSON + the fields the scripts maintain)."""
    data: dict[str, Any] = json.loads(h["job"])
    step, total = h.get("progress_step"), h.get("progress_total")
    return Job(
        **data,
        state=JobState(h["state"]),
        started_at=float(h["started_at"]) if h.get("started_at") else None,
        finished_at=float(h["finished_at"]) if h.get("finished_at") else None,
        attempts=int(h.get("attempts") or 0),
        worker_id=h.get("worker_id") or None,
        cancel_requested=h.get("cancel_requested") == "1",
        progress=Progress(step=int(step), total=int(total)) if step and total else None,
        result=JobResult.model_validate_json(h["result"]) if h.get("result") else None,
        error=JobError.model_validate_json(h["error"]) if h.get("error") else None,
    )
