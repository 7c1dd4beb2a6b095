"""``segquant serve``: the HTTP API; without a Redis URL also an in-process worker (embedded mode)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="run the HTTP API (embedded worker unless --redis-url is given)",
        description="Serve POST /generate, /jobs, /v1/images/generations, /models, /metrics. "
        "Without a Redis URL the queue and one worker run inside this process on the "
        "shipped model (variants fp, w8a8-segquant, w4a8-segquant). Settings come "
        "from --config (YAML/TOML/JSON), SEGQUANT_* variables, then these flags.",
    )
    p.add_argument("--config", help="settings file (YAML, TOML or JSON); also SEGQUANT_CONFIG")
    p.add_argument("--host", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default 8000)")
    p.add_argument("--redis-url", help="Redis URL: queue jobs there for `segquant worker` processes")
    p.add_argument(
        "--with-worker", action="store_true", help="with --redis-url: also run a worker inside the API process"
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from service.api.app import create_app
    from service.registry import Registry
    from service.settings import load_settings

    settings = load_settings(
        args.config,
        host=args.host,
        port=args.port,
        redis_url=args.redis_url,
        embedded_worker=True if args.with_worker else None,
    )
    Registry.from_settings(settings)  # a broken registry is a one-line CLI error, not a traceback at startup
    for name in ("service", "segquant_core"):
        logging.getLogger(name).setLevel(settings.log_level.upper())
    logging.getLogger().setLevel(min(logging.getLogger().level, logging.getLevelName(settings.log_level.upper())))
    # uvicorn drains on SIGTERM, then re-raises it to the previous handler: make that a clean exit.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        timeout_graceful_shutdown=int(settings.worker.drain_timeout_s),
    )
    return 0
