"""The ``tensorlotr`` command line: a thin layer over the Python API."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from ._version import __version__


class CLIError(Exception):
    """An error to report in one line, with a non-zero exit code."""


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo
    from .report import to_json

    if args.output is not None and Path(args.output).exists() and not args.force:
        raise FileExistsError(f"{args.output} already exists; pass --force to overwrite it")
    report = run_demo(
        args.data,
        args.eval_data,
        model_dir=args.model,
        rank=args.rank,
        seconds=args.seconds,
        max_steps=args.max_steps,
        output=args.output,
        seed=args.seed,
        progress=not args.json,
    )
    print(to_json(asdict(report)) if args.json else report.summary())
    if report.reload_max_abs_diff > 1e-5:
        print("error: the reloaded adapter does not reproduce the outputs", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tensorlotr",
        description="Low-tensor-rank (LoTR) adapters: convert, decompose, train, export.",
    )
    parser.add_argument("--version", action="version", version=f"tensorlotr {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser("demo", help="run the main job on the packaged default model")
    demo.add_argument("--data", type=Path, help="train on this TSV (sentence<TAB>label) instead of the built-in task")
    demo.add_argument("--eval-data", type=Path, help="evaluate on this TSV (default: 10%% held out of --data)")
    demo.add_argument("--model", type=Path, help="a local model folder (default: the packaged MiniLM)")
    demo.add_argument("--rank", type=int, default=8)
    demo.add_argument("--seconds", type=float, default=60.0, help="training time budget")
    demo.add_argument("--max-steps", type=int, default=2000)
    demo.add_argument("--output", type=Path, help="where to save the adapter (default: a temporary folder)")
    demo.add_argument("--force", action="store_true", help="overwrite --output if it exists")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--json", action="store_true", help="print the report as JSON")
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
