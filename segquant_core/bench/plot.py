"""Speed-up vs tokens per candidate, from ``bench layer`` JSON (needs matplotlib)."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path


def plot_speedup_vs_tokens(json_path: str | Path, png_path: str | Path, role: str = "qkv/to_out") -> Path:
    """One line per candidate: median speed-up over bf16 ``nn.Linear`` against M (tokens) for ``role`` shapes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(Path(json_path).read_text())
    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for row in data["rows"]:
        if row["shape"].startswith(role) and row["candidate"] not in ("bf16",):
            series[row["candidate"]].append((int(row["m"]), float(row["vs_bf16"])))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, pts in sorted(series.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax.axhline(1.0, color="grey", lw=1, ls="--")
    ax.set_xscale("log", base=2)
    env = data.get("environment", {})
    ax.set(
        xlabel="tokens (M)",
        ylabel="speed-up over bf16 nn.Linear",
        title=f"{role} layer — {env.get('cpu', '')}, {env.get('threads', '?')} threads",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(png_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
