"""Entry point of the ``segquant`` command."""

from __future__ import annotations

import argparse
import logging
import sys

from segquant_cli.commands import bench, export_onnx, plan, quantize, serve, stats, worker
from segquant_cli.commands import eval as eval_cmd
from segquant_cli.errors import CLIError

COMMANDS = [plan, quantize, eval_cmd, stats, bench, serve, worker, export_onnx]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="segquant", description="SegQuant: quantize diffusion models (SegLinear + DualScale) and serve them."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "run", None):
        parser.print_help()
        return 0
    try:
        return int(args.run(args) or 0)
    except CLIError as e:
        print(f"segquant: error: {e}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as e:
        print(f"segquant: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("segquant: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
