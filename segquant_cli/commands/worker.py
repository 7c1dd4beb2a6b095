"""``segquant worker --redis-url URL``: a worker process that runs jobs from the Redis queue (any number)."""

from __future__ import annotations

import argparse
import logging


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "worker",
        help="run a generation worker on the Redis queue",
        description="Read jobs of the served variants from Redis Streams, run them, write results. "
        "SIGTERM drains: the running batch finishes (or is handed back after "
        "worker.drain_timeout_s). Start as many as you like, on any machine.",
    )
    p.add_argument("--redis-url", help="Redis URL (or SEGQUANT_REDIS_URL / the config file)")
    p.add_argument("--config", help="settings file (YAML, TOML or JSON); also SEGQUANT_CONFIG")
    p.add_argument("--metrics-port", type=int, help="serve this worker's Prometheus metrics on this port (0 = off)")
    p.add_argument("--variants", help="comma-separated MODEL:VARIANT (or MODEL:*) to serve; default: all")
    p.add_argument("--id", dest="worker_id", help="worker (consumer) name; default host-pid-random")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from service.settings import load_settings
    from service.worker.process import run_worker

    settings = load_settings(args.config, redis_url=args.redis_url)
    worker = settings.worker.model_copy(
        update={
            k: v
            for k, v in {
                "metrics_port": args.metrics_port,
                "id": args.worker_id,
                "variants": [v.strip() for v in args.variants.split(",") if v.strip()] if args.variants else None,
            }.items()
            if v is not None
        }
    )
    settings = settings.model_copy(update={"worker": worker})
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )
    return run_worker(settings)
