"""``segquant plan MODEL_DIR``: show what SegQuant would do to every linear layer of a denoiser."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from segquant_cli.models import load_denoiser

if TYPE_CHECKING:
    from segquant_core.detect.plan import LayerPlan


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plan",
        help="detect SegLinear / DualScale layers and print the plan",
        description="Trace one forward pass of the denoiser and print one record per nn.Linear.",
    )
    p.add_argument("model_dir", help="diffusers pipeline or model directory (or hub id when online)")
    p.add_argument("--component", choices=["transformer", "unet"], help="which denoiser of a pipeline")
    p.add_argument(
        "--drop-components", default="", help="comma-separated optional components to load as None, e.g. text_encoder_3"
    )
    p.add_argument("--json", action="store_true", help="print the plan as JSON (the editable format)")
    p.add_argument("--reasons", action="store_true", help="include why each pattern fired (JSON only)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import segquant_core as sq
    from segquant_cli.commands.quantize import drop_list
    from segquant_core.detect import example_inputs_for

    model, _ = load_denoiser(args.model_dir, args.component, drop_list(args.drop_components))
    plan = sq.detect(model, example_inputs_for(model))
    if args.json:
        print(plan.to_json(with_reasons=args.reasons))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{type(model).__name__}: {plan!r}")
    table.add_column("layer")
    table.add_column("segments")
    table.add_column("dual-scale")
    for rec in plan:
        seg = "—" if rec.segments is None else f"{rec.segments.axis} {_sizes(rec.segments.sizes)}"
        table.add_row(rec.layer, seg, _dual(rec))
    Console().print(table)
    return 0


def _dual(rec: LayerPlan) -> str:
    """``yes``, blank, or which in-segments are dual (``segment 1``)."""
    if not isinstance(rec.dual_scale, tuple):
        return "yes" if rec.dual_scale else ""
    dual = [str(i) for i, d in enumerate(rec.dual_scale) if d]
    return f"segment{'s' if len(dual) > 1 else ''} {', '.join(dual)}"


def _sizes(sizes: tuple[int, ...]) -> str:
    if len(set(sizes)) == 1:
        return f"{len(sizes)}×{sizes[0]}"
    return "+".join(str(s) for s in sizes)
