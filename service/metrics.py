"""Every Prometheus collector of the service, in one place: ``segquant_`` prefix, base units, bounded labels.

Labels are limited to route templates, model, variant and adapter names from the registry, and small enums
(outcome, reason, mode); never prompts, job ids or user input. Each process (API, worker) owns one
:class:`Metrics` on its own registry: the API serves it at ``/metrics``, a worker on ``--metrics-port``.
Job-lifecycle histograms are observed where the work happens (the worker); the API adds HTTP, queue-depth
and rejection metrics. In embedded mode both live in one process and one registry.
"""

from __future__ import annotations

import platform
import threading
from importlib import metadata

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

from service import __version__

PREFIX = "segquant"
# Diffusion latencies run from sub-second (tiny models) to minutes (large ones on CPU).
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)
LOAD_BUCKETS = (0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)

MV = ("model", "variant")


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "none"


class Metrics:
    """The collectors, created on ``registry`` (a fresh one per process by default)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r, p = self.registry, PREFIX
        # --- HTTP (API process)
        self.http_requests = Counter(
            f"{p}_http_requests_total",
            "HTTP requests by route template and status",
            ["route", "method", "status"],
            registry=r,
        )
        self.http_duration = Histogram(
            f"{p}_http_request_duration_seconds",
            "HTTP request handling time",
            ["route", "method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.rejected = Counter(
            f"{p}_rejected_requests_total", "requests refused before a job was queued", ["reason"], registry=r
        )
        self.request_duration = Histogram(
            f"{p}_request_duration_seconds",
            "end-to-end latency of generation requests as the client saw it",
            [*MV, "mode"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        # --- queue (API process, refreshed at scrape time from the queue)
        self.jobs_submitted = Counter(f"{p}_jobs_submitted_total", "jobs accepted into the queue", MV, registry=r)
        self.queue_depth = Gauge(f"{p}_queue_depth", "jobs waiting (not started)", MV, registry=r)
        self.queue_capacity = Gauge(f"{p}_queue_capacity", "the bound on waiting jobs (503 above)", registry=r)
        self.workers_alive = Gauge(f"{p}_workers_alive", "workers with a fresh heartbeat", registry=r)
        # --- jobs (worker process)
        self.jobs_finished = Counter(
            f"{p}_jobs_finished_total", "jobs that reached a terminal state", [*MV, "outcome"], registry=r
        )
        self.jobs_failed = Counter(f"{p}_jobs_failed_total", "failed jobs by reason", [*MV, "reason"], registry=r)
        self.jobs_running = Gauge(f"{p}_jobs_running", "jobs running on this worker", MV, registry=r)
        self.queue_wait = Histogram(
            f"{p}_queue_wait_seconds", "submission to start", MV, buckets=LATENCY_BUCKETS, registry=r
        )
        self.inference = Histogram(
            f"{p}_inference_seconds", "pipeline call time (one per batch)", MV, buckets=LATENCY_BUCKETS, registry=r
        )
        self.job_duration = Histogram(
            f"{p}_job_duration_seconds", "submission to result (end to end)", MV, buckets=LATENCY_BUCKETS, registry=r
        )
        self.denoise_step = Histogram(
            f"{p}_denoise_step_seconds", "one denoising step of a batch", MV, buckets=STEP_BUCKETS, registry=r
        )
        self.batch_size = Histogram(
            f"{p}_batch_size", "images per pipeline call", MV, buckets=BATCH_BUCKETS, registry=r
        )
        self.images = Counter(f"{p}_images_generated_total", "images produced", MV, registry=r)
        self.redeliveries = Counter(
            f"{p}_job_redeliveries_total", "jobs reclaimed from a dead or stalled worker", MV, registry=r
        )
        self.dead_lettered = Counter(
            f"{p}_jobs_dead_lettered_total", "jobs moved to the dead-letter stream", MV, registry=r
        )
        self.duplicate_completions = Counter(
            f"{p}_duplicate_completions_total",
            "completions refused because the job had already finished",
            MV,
            registry=r,
        )
        # --- models (worker process)
        self.model_load = Histogram(
            f"{p}_model_load_seconds", "time to load a variant into memory", MV, buckets=LOAD_BUCKETS, registry=r
        )
        self.model_build = Histogram(
            f"{p}_model_build_seconds",
            "time to calibrate and write a missing artifact",
            MV,
            buckets=LOAD_BUCKETS,
            registry=r,
        )
        self.model_weight_bytes = Gauge(
            f"{p}_model_weight_bytes", "denoiser weight bytes of a loaded variant", MV, registry=r
        )
        self.model_peak_memory = Gauge(
            f"{p}_model_peak_memory_bytes",
            "peak memory while the variant ran (process RSS on CPU, CUDA max allocated on GPU)",
            [*MV, "kind"],
            registry=r,
        )
        self.variant_psnr = Gauge(
            f"{p}_variant_psnr_db",
            "PSNR of the variant against fp (dB), measured when it was built (eval.json next to its artifact)",
            MV,
            registry=r,
        )
        # --- adapters (worker process; labels: registry names only)
        self.adapter_loads = Counter(
            f"{p}_adapter_loads_total",
            "LoRA adapters loaded into a denoiser (a variant "
            "loads each adapter it uses once, again after an LRU unload)",
            ["model", "adapter"],
            registry=r,
        )
        self.adapter_jobs = Counter(
            f"{p}_adapter_jobs_total", "jobs that succeeded with the adapter applied", ["model", "adapter"], registry=r
        )
        self.models_loaded = Gauge(f"{p}_models_loaded", "variants held in memory by this worker", registry=r)
        self.variant_info = Gauge(
            f"{p}_variant_info",
            "recipe and precision of each loaded variant (value 1)",
            [*MV, "recipe", "precision", "device"],
            registry=r,
        )
        self.build_info = Gauge(
            f"{p}_build_info",
            "versions of this process (value 1)",
            ["version", "python", "torch", "diffusers", "segquant_core"],
            registry=r,
        )
        self.build_info.labels(
            __version__, platform.python_version(), _version("torch"), _version("diffusers"), _version("segquant-serve")
        ).set(1)


_lock = threading.Lock()
_metrics: Metrics | None = None


def get_metrics() -> Metrics:
    """The process-wide collectors (created on first use, never at import)."""
    global _metrics
    with _lock:
        if _metrics is None:
            disable_created_metrics()  # no *_created series: half the output, nothing dashboards use
            _metrics = Metrics()
        return _metrics
