"""Print docs/results.md's tables from the ladders' report.json files: the summary (architecture × rung), or
with ``--ladder NAME`` one model's ladder table (rung, PSNR, SSIM, latent MSE, weight bytes).

The rung names follow the variant list every ladder runs (``docs/results/run_ladder.sh``). Adherence is the
mean of background, colour, position and shape.
Usage: ``python docs/results/summary_table.py [--ladder flux]``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent
TARGET_ATTRIBUTES = ("background", "color", "position", "shape")

# (rung label, variant name in today's meaning); None = a gap in that ladder.
RUNGS: list[tuple[str, str]] = [
    ("W8A8 plain", "w8a8"),
    ("W8A8 + smooth", "w8a8-smooth"),
    ("W8A8 + smooth + seg", "w8a8-smooth:seg=on"),
    ("W8A8 + smooth + dual", "w8a8-smooth:dual=on"),
    ("W8A8 segquant (layer scope)", "w8a8-segquant"),
    ("W8A8 segquant, segment scope", "w8a8-segquant:smooth_scope=segment"),
    ("W4A8 plain (GPTQ, dynamic)", "w4a8-segquant:smooth=off+seg=off+dual=off"),
    ("W4A8 + smooth", "w4a8-segquant:seg=off+dual=off"),
    ("W4A8 + smooth + seg", "w4a8-segquant:dual=off"),
    ("W4A8 + smooth + dual", "w4a8-segquant:seg=off"),
    ("W4A8 segquant", "w4a8-segquant"),
    ("W4A8 segquant, segment scope", "w4a8-segquant:smooth_scope=segment"),
    ("FP8 per-tensor", "fp8-segquant:seg=off+dual=off"),
    ("FP8 segquant", "fp8-segquant"),
]
LADDERS = (("MMDiT", "mmdit"), ("UNet", "unet"), ("Flux", "flux"))


def _rows(folder: str) -> dict[str, dict[str, Any]]:
    report = json.loads((RESULTS / folder / "report.json").read_text())
    return {row["variant"]: row for row in report["variants"]}


def _cells(row: dict[str, Any] | None) -> list[str]:
    if row is None:
        return ["—"] * 4
    adherence = row.get("adherence") or {}
    mean = sum(adherence.get(a, 0.0) for a in TARGET_ATTRIBUTES) / len(TARGET_ATTRIBUTES)
    return [f"{row['psnr']:.2f}", f"{row['ssim']:.4f}", f"{row['latent_mse']:.5f}", f"{mean:.3f}"]


def table() -> str:
    ladders = [(name, _rows(folder)) for name, folder in LADDERS]
    head = ["rung"] + [f"{name} {m}" for name, _ in ladders for m in ("PSNR", "SSIM", "MSE", "adh.")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    fp = ["fp (adherence of the float model)"]
    for _, rows in ladders:
        fp += ["∞", "1", "0", _cells(rows["fp"])[3]]
    lines.append("| " + " | ".join(fp) + " |")
    for label, variant in RUNGS:
        cells = [label]
        for _, rows in ladders:
            cells += _cells(rows.get(variant))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def ladder_table(folder: str) -> str:
    """One model's rungs in the MMDiT section's layout (rungs it did not run are left out)."""
    rows = _rows(folder)
    lines = [
        "| rung | variant | PSNR vs fp (dB) | SSIM | latent MSE | adh. | weight bytes |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, variant in RUNGS:
        row = rows.get(variant)
        if row is not None:
            weight = f"{row['weight_bytes']:,}" if row.get("weight_bytes") else "float"
            lines.append(f"| {label} | `{variant}` | " + " | ".join(_cells(row)) + f" | {weight} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--ladder":
        sys.stdout.write(ladder_table(sys.argv[2]))
    else:
        sys.stdout.write(table())
