"""Print benchmark rows as a table and write them (with the environment) as JSON and as a Markdown table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def print_table(title: str, rows: list[dict[str, Any]], columns: list[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for c in columns:
        table.add_column(c, justify="left" if c in ("shape", "candidate", "variant", "case") else "right")
    for row in rows:
        table.add_row(*[_cell(row.get(c)) for c in columns])
    Console(width=200).print(table)


def _cell(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.2e}" if 0 < abs(v) < 1e-2 else f"{v:.3f}"
    if isinstance(v, int) and v > 100_000:
        return f"{v:,}"
    return str(v)


def write_json(
    path: str | Path,
    level: str,
    env: dict[str, Any],
    rows: list[dict[str, Any]],
    command: str,
    targets: list[dict[str, Any]] | None = None,
) -> Path:
    """The rows with what produced them; ``targets`` (met / not met items) when the level has any."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    data = {"level": level, "command": command, "environment": env, "rows": rows}
    if targets:
        data["targets"] = targets
    p.write_text(json.dumps(data, indent=2) + "\n")
    return p


def markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """The rows as a GitHub Markdown table (same cell formatting as the printed table)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_markdown(path: str | Path, title: str, rows: list[dict[str, Any]], columns: list[str], command: str) -> Path:
    """``title``, the exact command, and the table — ready to paste into docs/benchmarks.md."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(f"**{title}**\n\n`{command}`\n\n" + markdown_table(rows, columns))
    return p
