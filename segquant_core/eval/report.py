"""Write an :class:`EvalReport` as JSON, a Markdown table and a side-by-side grid PNG."""

from __future__ import annotations

import json
import math
from pathlib import Path

from PIL import Image

from segquant_core.eval.grid import MAX_ROWS, MAX_SIDE, sheet
from segquant_core.eval.runner import EvalReport


def _fmt(v: float | None, digits: int = 2) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float) and math.isinf(v):
        return "∞"
    return f"{v:.{digits}f}"


def markdown_table(report: EvalReport) -> str:
    attrs = sorted({k for v in report.variants if v.adherence for k in v.adherence})
    head = [
        "variant",
        "PSNR vs fp (dB)",
        "SSIM vs fp",
        "latent MSE",
        *[f"adherence: {a}" for a in attrs],
        "s/image",
        "weight bytes",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for v in report.variants:
        row = [v.variant, _fmt(v.psnr), _fmt(v.ssim, 4), _fmt(v.latent_mse, 5)]
        row += [_fmt((v.adherence or {}).get(a), 3) for a in attrs]
        row += [_fmt(v.seconds_per_image, 3), f"{v.weight_bytes:,}" if v.weight_bytes else "float"]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    lines.append(
        f"{len(report.eval_prompts)} evaluation prompts × {len(report.seeds)} seeds {report.seeds}; "
        f"{len(report.calibration_prompts)} calibration prompts (disjoint), "
        f"{report.calibration_samples} calibration samples; {report.num_inference_steps} steps, "
        f"guidance {report.guidance_scale}"
        + (f", {report.width}×{report.height} px." if report.height and report.width else ".")
    )
    return "\n".join(lines) + "\n"


def grid_image(report: EvalReport, max_rows: int = MAX_ROWS, max_side: int = MAX_SIDE) -> Image.Image:
    """Rows = prompts (first seed), columns = variants; small images enlarged, the sheet ≤ ``max_side`` a side."""
    seed = report.seeds[0]
    rows = min(len(report.eval_prompts), max_rows)
    columns = [
        (
            v.variant,
            {
                ri: report.generations[v.variant].images[(ri, seed)]
                for ri in range(rows)
                if (ri, seed) in report.generations[v.variant].images
            },
        )
        for v in report.variants
    ]
    return sheet(columns, rows, max_side)


def write_report(report: EvalReport, out_dir: str | Path) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "markdown": out / "report.md", "grid": out / "grid.png"}
    paths["json"].write_text(json.dumps(report.to_dict(), indent=2, default=str) + "\n")
    paths["markdown"].write_text(markdown_table(report))
    grid_image(report).save(paths["grid"])
    return paths
