"""``python -m loadtest --url http://127.0.0.1:8000 --variants fp,w8a8-segquant,w4a8-segquant …``"""

from __future__ import annotations

import argparse
import asyncio
import sys
from dataclasses import asdict
from pathlib import Path
from urllib.parse import urlparse

from loadtest.report import print_table, write_json, write_png
from loadtest.runner import LoadConfig, run
from loadtest.stats import summarize


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m loadtest", description="Load-test a SegQuant Serve instance.")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="service base URL (default: local)")
    p.add_argument("--variants", default="fp", help="comma-separated variants, requests spread round-robin")
    p.add_argument("--model", help="model name (default: the service's default)")
    p.add_argument("--mode", choices=["closed", "open"], default="closed")
    p.add_argument("--concurrency", type=int, default=4, help="clients in closed-loop mode")
    p.add_argument("--rate", type=float, default=1.0, help="arrivals per second in open-loop mode (Poisson)")
    p.add_argument("--requests", type=int, default=20, help="stop after this many requests")
    p.add_argument("--duration", type=float, default=120.0, help="stop issuing after this many seconds")
    p.add_argument("--steps", type=int, help="num_inference_steps for every request")
    p.add_argument("--size", type=int, help="width = height for every request")
    p.add_argument("--prompt", default="a small red circle in the top left on a blue background")
    p.add_argument("--api-key", help="bearer token when the service requires one")
    p.add_argument("--out", default="loadtest-out", help="directory for report.json and report.png")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    url = urlparse(args.url)
    if url.scheme not in ("http", "https") or not url.netloc:
        print(f"loadtest: error: --url must be an http(s) URL, got {args.url!r}", file=sys.stderr)
        return 2
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if not variants or args.requests < 1 or args.concurrency < 1 or args.rate <= 0 or args.duration <= 0:
        print(
            "loadtest: error: --variants must be non-empty; --requests, --concurrency, --rate and --duration "
            "must be positive",
            file=sys.stderr,
        )
        return 2
    cfg = LoadConfig(
        base_url=args.url,
        variants=variants,
        mode=args.mode,
        concurrency=args.concurrency,
        rate=args.rate,
        requests=args.requests,
        duration=args.duration,
        prompt=args.prompt,
        model=args.model,
        steps=args.steps,
        size=args.size,
        api_key=args.api_key,
    )
    samples, wall = asyncio.run(run(cfg))
    rows = summarize(samples, wall)
    print_table(rows)
    out = Path(args.out)
    config = {k: v for k, v in asdict(cfg).items() if k != "api_key"}
    write_json(out / "report.json", config, rows, samples, wall)
    write_png(out / "report.png", samples)
    print(f"wrote {out / 'report.json'} and {out / 'report.png'} ({len(samples)} requests in {wall:.1f} s)")
    return 0 if any(s.outcome == "ok" for s in samples) else 1


if __name__ == "__main__":
    sys.exit(main())
