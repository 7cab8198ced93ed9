"""The ``tensorlotr`` command line: a thin layer over the Python API."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from ._version import __version__


class CLIError(Exception):
    """An error to report in one line, with a non-zero exit code."""


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo
    from .io.atomic import check_output
    from .report import to_json

    check_output(args.output, args.force)
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


def _parse_rank(text: str) -> int | tuple[int, int]:
    """``8`` or ``16,8`` (r_out,r_in)."""
    try:
        parts = [int(p) for p in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"rank must be R or R_OUT,R_IN, got {text!r}") from None
    if len(parts) == 1:
        return parts[0]
    if len(parts) == 2:
        return parts[0], parts[1]
    raise argparse.ArgumentTypeError(f"rank must be R or R_OUT,R_IN, got {text!r}")


def _parse_groups(text: str) -> str | dict[str, list[str]]:
    """``by_name``, ``shared``, or ``name=pat1+pat2;name2=pat3``."""
    if text in ("by_name", "shared"):
        return text
    groups: dict[str, list[str]] = {}
    for item in text.split(";"):
        name, sep, patterns = item.partition("=")
        if not sep or not name or not patterns:
            raise argparse.ArgumentTypeError(f"groups must be by_name, shared or NAME=PAT+PAT;…, got {text!r}")
        groups[name.strip()] = [p.strip() for p in patterns.split("+")]
    return groups


def _cmd_convert(args: argparse.Namespace) -> int:
    from .convert import convert_lora
    from .progress import tqdm_progress
    from .report import to_json

    report = convert_lora(
        args.peft_dir, args.out_dir, rank=args.rank, energy=args.energy, n_iter=args.hooi_iters,
        groups=args.groups, force=args.force, progress=None if args.json else tqdm_progress,
    )  # fmt: skip
    print(to_json(report.to_dict()) if args.json else report.table())
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from .convert import export_lora
    from .report import to_json

    summary = export_lora(args.lotr_dir, args.out_dir, force=args.force)
    if args.json:
        print(to_json(summary))
    else:
        ranks = ", ".join(f"{g}: r={r}" for g, r in summary["ranks"].items())
        modules, params = summary["modules"], summary["lora_params"]
        print(f"wrote PEFT LoRA {summary['output']}: {modules} modules ({ranks}), {params:,} params")
    return 0


def _cmd_decompose(args: argparse.Namespace) -> int:
    import torch

    from .convert import export_lora
    from .decomposition import decompose
    from .io.atomic import check_output
    from .progress import tqdm_progress
    from .report import to_json

    lora_dir = None
    if args.export_lora is not None:  # a bare --export-lora writes OUT_DIR-lora next to OUT_DIR
        lora_dir = Path(args.export_lora) if args.export_lora else args.out_dir.with_name(args.out_dir.name + "-lora")
    if lora_dir is not None:
        check_output(lora_dir, args.force)
    result = decompose(
        args.base_dir, args.finetuned_dir, args.out_dir, target_modules=args.target_modules, rank=args.rank,
        energy=args.energy, groups=args.groups, n_iter=args.hooi_iters, save_changed_modules=args.save_changed_modules,
        force=args.force, dtype=getattr(torch, args.dtype), n_power=args.power_iters,
        progress=None if args.json else tqdm_progress,
    )  # fmt: skip
    report = result.report.to_dict()
    if lora_dir is not None:
        report["export_lora"] = export_lora(args.out_dir, lora_dir, force=args.force)
    if args.json:
        print(to_json(report))
    else:
        print(result.report.table())
        if lora_dir is not None:
            print(f"wrote PEFT LoRA {lora_dir}")
    return 0


def _parse_targets(text: str) -> list[str] | str:
    """``q_proj,v_proj`` (suffixes), or ``re:PATTERN`` for one regular expression."""
    if text.startswith("re:"):
        return text[3:]
    return [t.strip() for t in text.split(",") if t.strip()]


def _cmd_tb2parquet(args: argparse.Namespace) -> int:
    import warnings

    from .logs import EventFileWarning, tb2parquet
    from .progress import tqdm_progress
    from .report import to_json

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EventFileWarning)  # reported below, once per file
        summary = tb2parquet(
            args.log_dir, args.out, args.names, args.tags, args.index, wall_time=args.wall_time, jobs=args.jobs,
            strict=args.strict, force=args.force, progress=None if args.json else tqdm_progress,
        )  # fmt: skip
    for problem in summary.problems:
        print(f"warning: {problem} (kept what could be read)", file=sys.stderr)
    if args.json:
        print(to_json({**asdict(summary), "ratio": summary.ratio, "output": str(args.out)}))
    else:
        print(f"wrote {args.out}: {summary.text()}")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .convert import inspect_adapter
    from .report import format_table, to_json

    info = inspect_adapter(args.dir)
    if args.json:
        print(to_json(info))
    else:
        print(f"{info['path']}: {info['format']} adapter")
        print(format_table(info["groups"]))
        total = sum(g["params"] for g in info["groups"])
        print(f"total adapter params: {total:,}")
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

    convert = sub.add_parser("convert", help="convert a PEFT LoRA folder to a LoTR adapter")
    convert.add_argument("peft_dir", type=Path, metavar="PEFT_DIR")
    convert.add_argument("out_dir", type=Path, metavar="OUT_DIR")
    how = convert.add_mutually_exclusive_group()
    how.add_argument("--rank", type=_parse_rank, help="R or R_OUT,R_IN (default: exact, lossless)")
    how.add_argument("--energy", type=float, help="keep this fraction of squared singular values per group, e.g. 0.99")
    convert.add_argument("--hooi-iters", type=int, default=0, help="HOOI sweeps after the HOSVD (default 0)")
    convert.add_argument("--groups", type=_parse_groups, default="by_name", help="by_name, shared or NAME=PAT+PAT;…")
    convert.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists")
    convert.add_argument("--json", action="store_true", help="print the report as JSON")
    convert.set_defaults(func=_cmd_convert)

    export = sub.add_parser("export-lora", help="export a LoTR adapter as an exact PEFT LoRA folder")
    export.add_argument("lotr_dir", type=Path, metavar="LOTR_DIR")
    export.add_argument("out_dir", type=Path, metavar="OUT_DIR")
    export.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists")
    export.add_argument("--json", action="store_true", help="print the summary as JSON")
    export.set_defaults(func=_cmd_export)

    dec = sub.add_parser("decompose", help="decompose fine-tuned minus base weights into a LoTR adapter")
    dec.add_argument("base_dir", type=Path, metavar="BASE_DIR")
    dec.add_argument("finetuned_dir", type=Path, metavar="FINETUNED_DIR")
    dec.add_argument("out_dir", type=Path, metavar="OUT_DIR")
    dec.add_argument(
        "--target-modules", type=_parse_targets, required=True, help="q_proj,v_proj (suffixes) or re:REGEX"
    )
    how = dec.add_mutually_exclusive_group()
    how.add_argument("--rank", type=_parse_rank, help="R or R_OUT,R_IN (default: full rank, exact)")
    how.add_argument("--energy", type=float, help="keep this fraction of each group's squared norm, e.g. 0.9")
    dec.add_argument("--hooi-iters", type=int, default=0, help="HOOI sweeps (default 0)")
    dec.add_argument("--groups", type=_parse_groups, default="by_name", help="by_name, shared or NAME=PAT+PAT;…")
    dec.add_argument("--dtype", choices=["float32", "float64"], default="float32", help="compute dtype")
    dec.add_argument(
        "--power-iters", type=int, default=1, help="power iterations of the randomized route, one pass each (default 1)"
    )
    dec.add_argument("--save-changed-modules", action="store_true", help="keep other changed tensors (head, norms)")
    dec.add_argument(
        "--export-lora", nargs="?", const="", default=None, metavar="LORA_DIR",
        help="also write the PEFT LoRA form to LORA_DIR (default OUT_DIR-lora)",
    )  # fmt: skip
    dec.add_argument("--force", action="store_true", help="replace existing outputs")
    dec.add_argument("--json", action="store_true", help="print the report as JSON")
    dec.set_defaults(func=_cmd_decompose)

    logs = sub.add_parser("tb2parquet", help="a tree of TensorBoard runs into one zstd parquet file")
    logs.add_argument("log_dir", type=Path, metavar="LOG_DIR")
    logs.add_argument("out", type=Path, metavar="OUT.parquet")
    logs.add_argument("--names", nargs="+", default=None, help="column names of the path segments, outermost first")
    logs.add_argument("--tags", help="keep only tags matching this regular expression")
    logs.add_argument("--index", nargs="+", default=None, help="index columns (default: segments, tag, step, seed)")
    logs.add_argument("--wall-time", action="store_true", help="keep the wall_time column")
    logs.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="reader processes (default: all cores)")
    logs.add_argument("--strict", action="store_true", help="fail on a corrupt or truncated event file")
    logs.add_argument("--force", action="store_true", help="replace OUT.parquet if it exists")
    logs.add_argument("--json", action="store_true", help="print the summary as JSON")
    logs.set_defaults(func=_cmd_tb2parquet)

    inspect = sub.add_parser("inspect", help="groups, shapes, ranks, params and dtype of a LoTR or PEFT LoRA folder")
    inspect.add_argument("dir", type=Path, metavar="DIR")
    inspect.add_argument("--json", action="store_true", help="print as JSON")
    inspect.set_defaults(func=_cmd_inspect)
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
