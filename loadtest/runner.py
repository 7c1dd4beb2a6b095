"""Traffic shapes: closed loop (N clients, each waits for its answer) or open loop (Poisson arrivals).

Both stop by themselves after ``requests`` requests or ``duration`` seconds, whichever comes first, and
spread requests over the variants round-robin so every variant sees the same conditions.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from loadtest.client import Sample, generate


@dataclass
class LoadConfig:
    base_url: str
    variants: list[str]
    mode: str = "closed"  # closed | open
    concurrency: int = 4
    rate: float = 1.0  # requests per second (open loop)
    requests: int = 20
    duration: float = 120.0
    prompt: str = "a small red circle in the top left on a blue background"
    model: str | None = None
    steps: int | None = None
    size: int | None = None
    seed: int = 0
    timeout: float = 600.0
    api_key: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def body(self, variant: str, i: int) -> dict[str, Any]:
        b: dict[str, Any] = {"prompt": self.prompt, "variant": variant, "seed": self.seed + i, **self.extra}
        if self.model:
            b["model"] = self.model
        if self.steps:
            b["num_inference_steps"] = self.steps
        if self.size:
            b["width"] = b["height"] = self.size
        return b


async def run(cfg: LoadConfig) -> tuple[list[Sample], float]:
    """Run the load; returns the samples and the wall time of the run."""
    if not cfg.variants:
        raise ValueError("give at least one variant")
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    limits = httpx.Limits(max_connections=max(cfg.concurrency, 64))
    samples: list[Sample] = []
    counter = itertools.count()
    variant_cycle = itertools.cycle(cfg.variants)
    t0 = time.perf_counter()

    def next_request() -> tuple[int, str] | None:
        i = next(counter)
        if i >= cfg.requests or time.perf_counter() - t0 > cfg.duration:
            return None
        return i, next(variant_cycle)

    async with httpx.AsyncClient(base_url=cfg.base_url, timeout=cfg.timeout, headers=headers, limits=limits) as client:
        if cfg.mode == "closed":

            async def worker() -> None:
                while (req := next_request()) is not None:
                    i, variant = req
                    samples.append(await generate(client, cfg.body(variant, i), variant, t0))

            await asyncio.gather(*(worker() for _ in range(cfg.concurrency)))
        elif cfg.mode == "open":
            rng = random.Random(cfg.seed)
            tasks: list[asyncio.Task] = []

            async def one(i: int, variant: str) -> None:
                samples.append(await generate(client, cfg.body(variant, i), variant, t0))

            while (req := next_request()) is not None:
                tasks.append(asyncio.create_task(one(*req)))
                await asyncio.sleep(rng.expovariate(cfg.rate))
            await asyncio.gather(*tasks)
        else:
            raise ValueError(f"mode must be 'closed' or 'open', got {cfg.mode!r}")
    return samples, time.perf_counter() - t0
