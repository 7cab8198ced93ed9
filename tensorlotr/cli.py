"""The ``tensorlotr`` command line: a thin layer over the Python API."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ._version import __version__


class CLIError(Exception):
    """An error to report in one line, with a non-zero exit code."""


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_core_demo

    print(run_core_demo(seed=args.seed))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tensorlotr",
        description="Low-tensor-rank (LoTR) adapters: convert, decompose, train, export.",
    )
    parser.add_argument("--version", action="version", version=f"tensorlotr {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser("demo", help="run the main job on the packaged default model")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return int(args.func(args))
    except (CLIError, ValueError, FileNotFoundError, FileExistsError) as exc:
        print(f"tensorlotr {args.command}: error: {exc}", file=sys.stderr)
        return 2
