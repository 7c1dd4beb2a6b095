"""Per-variant summary of a run: throughput, latency percentiles, queue wait vs inference, error rates."""

from __future__ import annotations

import math
from typing import Any

from loadtest.client import Sample


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (``q`` in [0, 100]); ``None`` for no values."""
    if not values:
        return None
    v = sorted(values)
    pos = (len(v) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarize(samples: list[Sample], wall_s: float) -> list[dict[str, Any]]:
    rows = []
    for variant in sorted({s.variant for s in samples}):
        mine = [s for s in samples if s.variant == variant]
        ok = [s for s in mine if s.outcome == "ok"]
        lat = [s.latency_s for s in ok]
        rows.append(
            {
                "variant": variant,
                "requests": len(mine),
                "ok": len(ok),
                "throughput_rps": len(ok) / wall_s if wall_s > 0 else 0.0,
                "p50_s": percentile(lat, 50),
                "p90_s": percentile(lat, 90),
                "p99_s": percentile(lat, 99),
                "queue_wait_mean_s": _mean([s.queue_wait_s for s in ok if s.queue_wait_s is not None]),
                "inference_mean_s": _mean([s.inference_s for s in ok if s.inference_s is not None]),
                "error_rate": sum(s.outcome == "error" for s in mine) / len(mine),
                "rejected_rate": sum(s.outcome == "rejected" for s in mine) / len(mine),
            }
        )
    return rows
