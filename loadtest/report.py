"""Print the summary table, write JSON, and draw a PNG: latency CDF per variant, throughput over time."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from loadtest.client import Sample


def print_table(rows: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    cols = [
        "variant",
        "requests",
        "ok",
        "throughput_rps",
        "p50_s",
        "p90_s",
        "p99_s",
        "queue_wait_mean_s",
        "inference_mean_s",
        "error_rate",
        "rejected_rate",
    ]
    table = Table(title="loadtest — per variant")
    for c in cols:
        table.add_column(c, justify="left" if c == "variant" else "right")
    for r in rows:
        table.add_row(
            *["–" if r[c] is None else (f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c])) for c in cols]
        )
    Console(width=200).print(table)


def write_json(
    path: Path, config: dict[str, Any], rows: list[dict[str, Any]], samples: list[Sample], wall_s: float
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps(
            {"config": config, "wall_s": wall_s, "summary": rows, "samples": [asdict(s) for s in samples]}, indent=2
        )
        + "\n"
    )


def write_png(path: Path, samples: list[Sample], bin_s: float | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = sorted({s.variant for s in samples})
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    end = max((s.started + s.latency_s for s in samples), default=1.0)
    bin_s = bin_s or max(1.0, end / 20)
    for v in variants:
        ok = sorted(s.latency_s for s in samples if s.variant == v and s.outcome == "ok")
        if ok:
            ax1.step(ok, [(i + 1) / len(ok) for i in range(len(ok))], where="post", label=v)
        done = [s.started + s.latency_s for s in samples if s.variant == v and s.outcome == "ok"]
        nbins = int(end // bin_s) + 1
        counts = [0] * nbins
        for t in done:
            counts[int(t // bin_s)] += 1
        ax2.plot([i * bin_s for i in range(nbins)], [c / bin_s for c in counts], marker="o", label=v)
    ax1.set(xlabel="latency (s)", ylabel="fraction of requests", title="latency CDF")
    ax2.set(xlabel="time since start (s)", ylabel="completed requests / s", title="throughput over time")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # nothing completed (e.g. server unreachable): no lines to label
            ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
