"""Every Redis key the service uses, in one place (all under the configurable prefix).

=============================  ======  ==========================================================
key                            type    what
=============================  ======  ==========================================================
{p}:stream:{model}:{variant}   stream  the variant's queue; entries carry only ``job_id``
{p}:job:{id}                   hash    job state, resolved parameters, result / error (TTL once done)
{p}:events:{id}                stream  the job's event log, read by SSE and sync waits (TTL once done)
{p}:queued                     string  queued (not yet started) jobs, all variants: the capacity bound
{p}:queued:{model}:{variant}   string  queued jobs of one variant (queue-depth gauge)
{p}:idem:{sha256}              hash    Idempotency-Key → job id + request hash
{p}:dlq                        stream  dead-lettered jobs (job id, variant, deliveries, reason)
{p}:workers                    zset    worker ids by last heartbeat
{p}:worker:{id}                string  the worker's advertisement (JSON, TTL = liveness)
{p}:stats:{model}:{variant}    list    recent per-job timings (JSON), newest first
=============================  ======  ==========================================================
"""

from __future__ import annotations

from dataclasses import dataclass

from service.registry import VariantKey

GROUP = "workers"
EVENTS_MAXLEN = 1000
STATS_KEEP = 256


@dataclass(frozen=True)
class Keys:
    prefix: str

    def job(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    def events(self, job_id: str) -> str:
        return f"{self.prefix}:events:{job_id}"

    def stream(self, key: VariantKey) -> str:
        return f"{self.prefix}:stream:{key.model}:{key.variant}"

    def queued_total(self) -> str:
        return f"{self.prefix}:queued"

    def queued(self, key: VariantKey) -> str:
        return f"{self.prefix}:queued:{key.model}:{key.variant}"

    def idempotency(self, digest: str) -> str:
        return f"{self.prefix}:idem:{digest}"

    def dlq(self) -> str:
        return f"{self.prefix}:dlq"

    def workers(self) -> str:
        return f"{self.prefix}:workers"

    def worker(self, worker_id: str) -> str:
        return f"{self.prefix}:worker:{worker_id}"

    def stats(self, key: VariantKey) -> str:
        return f"{self.prefix}:stats:{key.model}:{key.variant}"
