"""Merge the reports of a ladder run as several ``segquant eval`` processes into one report.json + report.md.

Each part generated its own fp images and recorded its own calibration calls from the same seeds; the merge
refuses parts whose prompts, seeds, calibration or fp images (adherence, s/image aside) differ, so every row is
scored against the same float images. Usage: ``python merge_reports.py OUT_DIR PART/report.json ...``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from segquant_core.eval.report import markdown_table
from segquant_core.eval.runner import EvalReport, VariantResult

SAME_IN_EVERY_PART = (
    "model",
    "eval_prompts",
    "calibration_prompt_count",
    "calibration_samples",
    "seeds",
    "num_inference_steps",
    "guidance_scale",
    "height",
    "width",
)


def merge(parts: list[dict[str, Any]]) -> EvalReport:
    first = parts[0]
    for part in parts[1:]:
        for key in SAME_IN_EVERY_PART:
            if part[key] != first[key]:
                raise SystemExit(f"parts differ in {key!r}: {part[key]!r} vs {first[key]!r}")
        fp, fp0 = part["variants"][0], first["variants"][0]
        if fp["adherence"] != fp0["adherence"]:
            raise SystemExit("parts' fp images differ (adherence): not the same float reference")
    variants = [VariantResult(**first["variants"][0])]
    seen = {"fp"}
    for part in parts:
        for row in part["variants"]:
            if row["variant"] not in seen:
                seen.add(row["variant"])
                variants.append(VariantResult(**row))
    return EvalReport(
        model=first["model"],
        variants=variants,
        eval_prompts=first["eval_prompts"],
        calibration_prompts=[""] * first["calibration_prompt_count"],
        seeds=first["seeds"],
        num_inference_steps=first["num_inference_steps"],
        guidance_scale=first["guidance_scale"],
        calibration_samples=first["calibration_samples"],
        height=first["height"],
        width=first["width"],
        unscored_prompts=first.get("unscored_prompts", []),
    )


def main(out_dir: str, *paths: str) -> None:
    parts = [json.loads(Path(p).read_text()) for p in paths]
    report = merge(parts)
    out = Path(out_dir)
    record = report.to_dict() | {"calibration_prompts": None, "parts": list(paths)}
    (out / "report.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    (out / "report.md").write_text(markdown_table(report))
    sys.stdout.write((out / "report.md").read_text())


if __name__ == "__main__":
    main(*sys.argv[1:])
