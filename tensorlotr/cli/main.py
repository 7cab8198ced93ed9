"""The ``tensorlotr`` command line: a thin layer over the Python API.

Every command prints its job's :class:`tensorlotr.report.Result`: ``text()`` for the
terminal, ``to_json()`` with ``--json``. Every flag is checked before any work starts.

Exit codes: 0 on success; 2 when the input is at fault (a bad flag, a bad or missing input
file, an output that exists without ``--force``); 1 when the run fails for another reason
(an I/O error, say); 130 on Ctrl-C and 143 on SIGTERM, after removing partial output (0
when the signal came once the outputs were complete, which the message then says).
Errors are one line, ``tensorlotr COMMAND: error: …``; ``--debug`` adds the traceback.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import signal
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._version import __version__

if TYPE_CHECKING:
    from types import FrameType

    from ..jobs.calibration import Calibration
    from ..report import Result


class Terminated(BaseException):
    """Raised by the SIGTERM handler so that partial outputs are removed on the way out.

    A ``BaseException``, as ``KeyboardInterrupt``: ``except Exception`` does not swallow it,
    while the ``finally`` blocks and the atomic writers' clean-up run; :func:`main` then
    exits with 143.

    Examples
    --------
    >>> try:
    ...     raise Terminated
    ... except Exception:
    ...     print("caught as an error")
    ... except BaseException as exc:
    ...     print(f"{type(exc).__name__}: clean up, exit code 143")
    Terminated: clean up, exit code 143
    """


# --- flag types: each checks its value while the arguments are parsed --------------------


def _split_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def parse_rank(text: str) -> int | tuple[int, int]:
    """``8`` or ``16,8`` (``R_OUT,R_IN``); every rank a positive integer.

    ``U`` is then (d_out, R_OUT), ``V`` (d_in, R_IN) and each core (R_OUT, R_IN).

    Examples
    --------
    >>> parse_rank("8"), parse_rank("16,8")
    (8, (16, 8))
    >>> parse_rank("0")
    Traceback (most recent call last):
    argparse.ArgumentTypeError: rank must be R or R_OUT,R_IN (positive integers), got '0'
    """
    try:
        parts = [int(p) for p in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"rank must be R or R_OUT,R_IN (positive integers), got {text!r}") from None
    if len(parts) not in (1, 2) or min(parts) <= 0:
        raise argparse.ArgumentTypeError(f"rank must be R or R_OUT,R_IN (positive integers), got {text!r}")
    return parts[0] if len(parts) == 1 else (parts[0], parts[1])


def parse_energy(text: str) -> float:
    """A fraction in (0, 1].

    Examples
    --------
    >>> parse_energy("0.99")
    0.99
    >>> parse_energy("1.5")
    Traceback (most recent call last):
    argparse.ArgumentTypeError: energy must be a number in (0, 1], got '1.5'
    """
    return _share(text, "energy must be")


def _share(text: str, refusal: str) -> float:
    """``text`` as a number in (0, 1]; else ``ArgumentTypeError`` "<refusal> a number in (0, 1], got …"."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"{refusal} a number in (0, 1], got {text!r}")
    return value


def _bounded_int(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _regex(text: str) -> str:
    try:
        re.compile(text)
    except re.error as exc:
        raise argparse.ArgumentTypeError(f"invalid regular expression {text!r}: {exc}") from None
    return text


def parse_targets(text: str) -> list[str] | str:
    """``q_proj,v_proj`` (name suffixes), or ``re:PATTERN`` for one regular expression.

    Examples
    --------
    >>> parse_targets("q_proj, v_proj")
    ['q_proj', 'v_proj']
    >>> print(parse_targets(r"re:.*\\.(q|v)_proj"))
    .*\\.(q|v)_proj
    """
    if text.startswith("re:"):
        return _regex(text[3:])
    targets = _split_list(text)
    if not targets:
        raise argparse.ArgumentTypeError("target modules must not be empty")
    return targets


def parse_groups(text: str) -> str | dict[str, list[str]]:
    """``by_name``, ``shared``, or ``NAME=PAT,PAT;NAME2=PAT`` (patterns comma-separated).

    Examples
    --------
    >>> parse_groups("shared")
    'shared'
    >>> parse_groups("attn=q_proj,v_proj;mlp=up_proj")
    {'attn': ['q_proj', 'v_proj'], 'mlp': ['up_proj']}
    """
    if text in ("by_name", "shared"):
        return text
    groups: dict[str, list[str]] = {}
    for item in text.split(";"):
        name, sep, patterns = item.partition("=")
        name = name.strip()
        if not sep or not name or not patterns.strip():
            raise argparse.ArgumentTypeError(f"groups must be by_name, shared or NAME=PAT,PAT;…, got {text!r}")
        if "+" in patterns and "," not in patterns:
            warnings.warn("NAME=PAT+PAT in --groups is deprecated; use NAME=PAT,PAT", FutureWarning, stacklevel=2)
            patterns = patterns.replace("+", ",")
        if name in groups:
            raise argparse.ArgumentTypeError(f"group {name!r} is given twice in --groups")
        groups[name] = _split_list(patterns)
    return groups


class _ListAction(argparse.Action):
    """A comma-separated list; the old space-separated form still works, with a deprecation warning."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        values = [values] if isinstance(values, str) else list(values or [])
        if len(values) > 1:
            warnings.warn(
                f"{option_string} A B C is deprecated; use {option_string} A,B,C", FutureWarning, stacklevel=2
            )
        items = [item for value in values for item in _split_list(value)]
        if not items:
            parser.error(f"{option_string} must not be empty")
        setattr(namespace, self.dest, items)


# --- commands ------------------------------------------------------------------------------


def _check_outputs(out: Path | None, inputs: Sequence[Path], force: bool) -> None:
    """Refuse ``.``/``..``, outputs that overlap an input (even with ``--force``), and existing outputs."""
    from ..files.atomic import check_output

    check_output(out, force, inputs=inputs)


def _cmd_demo(args: argparse.Namespace) -> Result:
    from ..jobs.demo import run_demo
    from ..progress import tqdm_progress

    inputs = [p for p in (args.data, args.eval_data, args.model) if p is not None]
    if args.output is not None:
        _check_outputs(args.output, inputs, args.force)
    report = run_demo(
        args.data, args.eval_data, model_dir=args.model, rank=args.rank, seconds=args.seconds,
        max_steps=args.max_steps, output=args.output, seed=args.seed,
        progress=None if args.json else tqdm_progress,
    )  # fmt: skip
    if report.reload_max_abs_diff > 1e-5:
        _print(report, args)
        raise RuntimeError("the reloaded adapter does not reproduce the outputs")
    return report


def _cmd_convert(args: argparse.Namespace) -> Result:
    from ..jobs.convert import convert_lora
    from ..jobs.original import convert_original, is_original_checkpoint
    from ..progress import tqdm_progress

    _check_outputs(args.out_dir, [args.peft_dir], args.force)
    if is_original_checkpoint(args.peft_dir):  # the original LoTR code's state dict: read exactly
        if args.base_model is None:
            raise ValueError(f"{args.peft_dir} is a checkpoint of the original LoTR code; give its --base-model DIR")
        flags = {"--rank": args.rank, "--energy": args.energy, "--calibration-data": args.calibration_data,
                 "--hooi-iters": args.hooi_iters or None, "--dtype": args.dtype,
                 "--groups": None if args.groups == "by_name" else args.groups}  # fmt: skip
        given = [flag for flag, value in flags.items() if value is not None]
        if given:
            raise ValueError(f"{given[0]} does not apply to a checkpoint of the original LoTR code (read exactly)")
        _check_outputs(args.out_dir, [args.peft_dir, args.base_model], args.force)
        scale = 1.0 if args.scale is None else args.scale
        return convert_original(args.peft_dir, args.base_model, args.out_dir, scale=scale, force=args.force)
    if args.scale is not None:
        raise ValueError(f"--scale applies to checkpoints of the original LoTR code; {args.peft_dir} is not one")
    return convert_lora(
        args.peft_dir, args.out_dir, rank=args.rank, energy=args.energy, n_iter=args.hooi_iters,
        groups=args.groups, force=args.force, progress=None if args.json else tqdm_progress,
        calibration=_calibration(args, args.peft_dir), dtype=args.dtype, min_retention=args.min_retention,
    )  # fmt: skip


def _cmd_export(args: argparse.Namespace) -> Result:
    from ..jobs.convert import export_lora

    _check_outputs(args.out_dir, [args.lotr_dir], args.force)
    return export_lora(args.lotr_dir, args.out_dir, adapter=args.adapter, force=args.force, dtype=args.dtype)


def _cmd_zoo_compress(args: argparse.Namespace) -> Result:
    from ..jobs.zoo import compress_zoo
    from ..progress import tqdm_progress

    if len(args.paths) < 2:
        raise ValueError("zoo compress needs at least one SOURCE and the OUT_DIR")
    *sources, out_dir = args.paths
    _check_outputs(out_dir, sources, args.force)
    return compress_zoo(
        sources, out_dir, names=args.names, rank=args.rank, energy=args.energy, n_iter=args.hooi_iters,
        groups=args.groups, force=args.force, progress=None if args.json else tqdm_progress,
        calibration=_calibration(args, sources[0]), fairness=args.fairness, min_retention=args.min_retention,
        residual_rank=_residual_rank(args),
    )  # fmt: skip


def _residual_rank(args: argparse.Namespace) -> int | dict[str, int] | None:
    """``--residual-rank``: S for every adapter, or ``NAME=S`` for those named."""
    given: list[str] = args.residual_rank or []
    if not given:
        return None
    try:
        if len(given) == 1 and "=" not in given[0]:
            return _bounded_int(0)(given[0])
        pairs = [g.split("=", 1) for g in given]
        if any(len(p) != 2 for p in pairs):
            raise argparse.ArgumentTypeError(f"expected S or NAME=S, got {given}")
        return {name: _bounded_int(0)(size) for name, size in pairs}
    except argparse.ArgumentTypeError as exc:
        args.parser.error(f"--residual-rank: {exc}")
        raise  # parser.error exits


def _cmd_zoo_add(args: argparse.Namespace) -> Result:
    from ..jobs.zoo import add_to_zoo
    from ..progress import tqdm_progress

    return add_to_zoo(
        args.zoo_dir, args.source, name=args.name, refit=args.refit, rank=args.rank, energy=args.energy,
        n_iter=args.hooi_iters, progress=None if args.json else tqdm_progress, residual_rank=args.residual_rank,
    )  # fmt: skip


def _cmd_decompose(args: argparse.Namespace) -> Result:
    import torch

    from ..jobs.convert import export_lora
    from ..jobs.decompose import decompose
    from ..progress import tqdm_progress

    inputs = [args.base_dir, args.finetuned_dir]
    _check_outputs(args.out_dir, inputs, args.force)
    lora_dir = None
    if args.export_lora is not None:  # a bare --export-lora writes OUT_DIR-lora next to OUT_DIR
        lora_dir = Path(args.export_lora) if args.export_lora else args.out_dir.with_name(args.out_dir.name + "-lora")
        _check_outputs(lora_dir, [*inputs, args.out_dir], args.force)
    result = decompose(
        args.base_dir, args.finetuned_dir, args.out_dir, target_modules=args.target_modules, rank=args.rank,
        energy=args.energy, groups=args.groups, n_iter=args.hooi_iters, save_changed_modules=args.save_changed_modules,
        force=args.force, dtype=getattr(torch, args.dtype), n_power=args.power_iters,
        progress=None if args.json else tqdm_progress, calibration=_calibration(args, args.base_dir, args.base_dir),
    )  # fmt: skip
    report = result.report
    if lora_dir is not None:
        report.export_lora = export_lora(args.out_dir, lora_dir, force=args.force)
    return report


def _cmd_tb2parquet(args: argparse.Namespace) -> Result:
    from ..jobs.logs import EventFileWarning, tb2parquet
    from ..progress import tqdm_progress

    _check_outputs(args.out, [args.log_dir], args.force)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EventFileWarning)  # reported below, once per file
        summary = tb2parquet(
            args.log_dir, args.out, args.names, args.tags, args.index, wall_time=args.wall_time, jobs=args.jobs,
            strict=args.strict, force=args.force, progress=None if args.json else tqdm_progress,
        )  # fmt: skip
    for problem in summary.problems:
        print(f"warning: {problem} (kept what could be read)", file=sys.stderr)
    return summary


def _cmd_inspect(args: argparse.Namespace) -> Result:
    from ..jobs.convert import inspect_adapter

    return inspect_adapter(args.dir)


# --- the parser ----------------------------------------------------------------------------


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, but not for flags whose default means "not given"."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False) or action.default is argparse.SUPPRESS:
            return action.help or ""
        return super()._get_help_string(action) or ""


def _command(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    help_text: str,
    func: Callable[[argparse.Namespace], Result],
) -> argparse.ArgumentParser:
    parser = sub.add_parser(name, help=help_text, description=help_text, formatter_class=_Formatter)
    parser.set_defaults(func=func, parser=parser)
    return parser


def _common(parser: argparse.ArgumentParser, force_help: str | None = "replace the output if it exists") -> None:
    if force_help:
        parser.add_argument("--force", action="store_true", help=force_help)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")


def _rank_flags(parser: argparse.ArgumentParser, rank_help: str, energy_help: str) -> None:
    how = parser.add_mutually_exclusive_group()
    how.add_argument("--rank", type=parse_rank, metavar="R|R_OUT,R_IN", help=rank_help)
    how.add_argument("--energy", type=parse_energy, metavar="FRACTION", help=energy_help)
    parser.add_argument(
        "--hooi-iters", type=_bounded_int(0), default=0, metavar="N", help="HOOI sweeps after the HOSVD"
    )
    parser.add_argument(
        "--groups", type=parse_groups, default="by_name", metavar="MODE",
        help="by_name (a stack per projection), shared (a stack per shape) or NAME=PAT,PAT;NAME2=PAT",
    )  # fmt: skip


def _calibration_flags(parser: argparse.ArgumentParser, *, heal_factors: bool, heal: bool = True) -> None:
    """Output-aware compression: the base model, the calibration texts, and the heal (``heal``)."""
    if heal:
        parser.add_argument("--base-model", type=Path, metavar="DIR", help="the base model folder, for calibration")
    parser.add_argument(
        "--calibration-data", type=Path, metavar="FILE",
        help="calibration texts: one per line, or a .tsv with a header and the text first; minimises the "
        "error of each layer's outputs on them instead of the weight error"
        + (" (needs --base-model)" if heal else " (the base model is BASE_DIR; needs --rank)"),
    )  # fmt: skip
    parser.add_argument(
        "--calibration-samples", type=_bounded_int(1), default=256, metavar="N", help="calibration texts to use"
    )
    parser.add_argument(
        "--objective", choices=["output", "weight"], default="output",
        help="with --calibration-data, what is minimised: the layers' output error on the texts, or the weight "
        "error (the texts then measure the output error and serve the heal)",
    )  # fmt: skip
    if not heal:
        return
    parser.add_argument(
        "--heal-steps", type=_bounded_int(0), default=0, metavar="N",
        help="then train the cores N steps to reproduce the LoRA's outputs on the calibration texts",
    )  # fmt: skip
    parser.add_argument("--heal-lr", type=_positive_float, default=1e-3, metavar="LR", help="the heal's learning rate")
    if heal_factors:
        parser.add_argument("--heal-factors", action="store_true", help="the heal trains the factors too")
    zoo = not heal_factors
    parser.add_argument(
        "--eval-data", action="append", metavar="NAME=FILE" if zoo else "FILE",
        help="held-out texts (a .tsv with integer labels gives the retained gain too) to report the retention on; "
        "default: the last eighth of --calibration-data, which the fit and the heal then do not see"
        + ("; NAME=FILE, repeated, gives each adapter its own" if zoo else ""),
    )  # fmt: skip
    parser.add_argument(
        "--min-retention", type=_retention, metavar="FRACTION",
        help="hold every adapter's held-out retention (retained gain with labels, else agreement) at least this "
        + ("high, e.g. 0.95: adapters short of it get a private residual; without held-out texts, every adapter "
           "keeps this share of its (output) energy in every group, ranks raised where needed"
           if zoo else "high, e.g. 0.95, by raising the rank"),
    )  # fmt: skip


def _calibration(args: argparse.Namespace, adapter: Path, base_model: Path | None = None) -> Calibration | None:
    """The job's ``calibration`` from the flags (None without --calibration-data)."""
    if args.calibration_data is None:
        return None
    from ..jobs.calibration import calibration_from_files

    return calibration_from_files(
        base_model or args.base_model, args.calibration_data, adapter, samples=args.calibration_samples,
        heal_steps=getattr(args, "heal_steps", 0), heal_lr=getattr(args, "heal_lr", 1e-3),
        heal_factors=getattr(args, "heal_factors", False), objective=args.objective,
        eval_data=_eval_data(args),
    )  # fmt: skip


def _eval_data(args: argparse.Namespace) -> Path | dict[str, Path] | None:
    """``--eval-data``: one file, or (a zoo) ``NAME=FILE`` per adapter."""
    given: list[str] = getattr(args, "eval_data", None) or []
    if not given:
        return None
    named = [g for g in given if "=" in g and not Path(g).exists()]
    if not named:
        if len(given) > 1:
            args.parser.error("--eval-data: give one FILE, or NAME=FILE for each adapter of a zoo")
        return Path(given[0])
    if len(named) != len(given) or args.command == "convert":
        args.parser.error("--eval-data: NAME=FILE is for a zoo's adapters, given for each of them")
    pairs = [g.split("=", 1) for g in named]
    return {name: Path(path) for name, path in pairs}


def _check_calibration(args: argparse.Namespace) -> None:
    """--calibration-data needs --base-model; the heal and the other calibration flags need --calibration-data."""
    if not hasattr(args, "calibration_data") or not hasattr(args, "base_model"):  # decompose: BASE_DIR
        return
    if args.calibration_data is not None and args.base_model is None:
        args.parser.error("--calibration-data needs --base-model DIR")
    if args.calibration_data is None and args.command == "convert" and args.base_model is not None:
        from ..jobs.original import is_original_checkpoint

        if is_original_checkpoint(args.peft_dir):  # the base model the original code's checkpoint came from
            return
    if args.calibration_data is None:
        given = [
            flag for flag, on in (("--base-model", args.base_model is not None), ("--heal-steps", args.heal_steps > 0),
                                  ("--heal-factors", getattr(args, "heal_factors", False)),
                                  ("--eval-data", bool(getattr(args, "eval_data", None))))
            if on
        ]  # fmt: skip
        if given:
            args.parser.error(f"{given[0]} needs --calibration-data FILE")


def _dtype_flag(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--dtype", choices=["float32", "float64", "float16", "bfloat16"],
        help=f"dtype of {what} (default: the source's, at least float32)",
    )  # fmt: skip


def _retention(text: str) -> float:
    """A number in (0, 1]."""
    return _share(text, "expected")


def build_parser() -> argparse.ArgumentParser:
    """The ``tensorlotr`` parser: one subcommand per job, each flag checked as it is parsed.

    The documentation's CLI reference is generated from it. Each subcommand's namespace
    carries ``func`` (the command to run) and ``parser`` (its own parser, for errors).

    Examples
    --------
    >>> parser = build_parser()
    >>> args = parser.parse_args(["convert", "my-lora", "my-lotr", "--rank", "16,8", "--groups", "shared"])
    >>> args.command, str(args.peft_dir), args.rank, args.groups, args.force
    ('convert', 'my-lora', (16, 8), 'shared', False)
    >>> args = parser.parse_args(["decompose", "base", "ft", "out", "--target-modules", "q_proj,v_proj"])
    >>> args.target_modules, args.rank, args.dtype
    (['q_proj', 'v_proj'], None, 'float32')
    >>> args = parser.parse_args(["tb2parquet", "runs", "logs.parquet", "--names", "dataset,method,lr,seed"])
    >>> args.names, args.index
    (['dataset', 'method', 'lr', 'seed'], None)
    """
    parser = argparse.ArgumentParser(
        prog="tensorlotr",
        description="Low-tensor-rank (LoTR) adapters: convert, decompose, train, export.",
        epilog="Exit codes: 0 success, 2 bad input or usage, 1 other failure, 130/143 interrupted.",
    )
    parser.add_argument("--version", action="version", version=f"tensorlotr {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = _command(sub, "demo", "train a LoTR adapter on the packaged default model, save, reload, check", _cmd_demo)
    demo.add_argument("--data", type=Path, metavar="TSV", help="train on this TSV (sentence<TAB>label)")
    demo.add_argument("--eval-data", type=Path, metavar="TSV", help="evaluate on this TSV (default: 10%% of --data)")
    demo.add_argument("--model", type=Path, metavar="DIR", help="a local model folder (default: the packaged MiniLM)")
    demo.add_argument("--rank", type=parse_rank, default=8, metavar="R|R_OUT,R_IN", help="LoTR rank")
    demo.add_argument("--seconds", type=_positive_float, default=60.0, help="training time budget")
    demo.add_argument("--max-steps", type=_bounded_int(1), default=2000, metavar="N", help="training steps at most")
    demo.add_argument("--output", type=Path, metavar="DIR", help="save the adapter here (default: a temporary folder)")
    demo.add_argument("--seed", type=int, default=0, help="random seed")
    _common(demo, "replace --output if it exists")

    convert = _command(sub, "convert", "convert a PEFT LoRA folder to a LoTR adapter", _cmd_convert)
    convert.add_argument(
        "peft_dir", type=Path, metavar="PEFT_DIR",
        help="a PEFT LoRA folder (adapter_config.json), or a checkpoint of the original LoTR code (daskol/lotr: "
        "a state dict file or model folder with ….lotr.lhs/mid/rhs), read exactly against --base-model",
    )  # fmt: skip
    convert.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="the LoTR adapter folder to write")
    _rank_flags(
        convert, "Tucker ranks of every group (default: the exact rank, lossless)",
        "keep this fraction of each group's squared singular values, e.g. 0.99",
    )  # fmt: skip
    _calibration_flags(convert, heal_factors=True)
    _dtype_flag(convert, "the factors and cores written")
    convert.add_argument(
        "--scale", type=_positive_float, metavar="S",
        help="an original LoTR checkpoint's LoTRLinear scale (default 1; the update is S / rank times the product)",
    )  # fmt: skip
    _common(convert)

    export = _command(sub, "export-lora", "export a LoTR adapter as an exact PEFT LoRA folder", _cmd_export)
    export.add_argument("lotr_dir", type=Path, metavar="LOTR_DIR", help="a LoTR adapter folder (lotr_config.json)")
    export.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="the PEFT LoRA folder to write")
    export.add_argument("--adapter", metavar="NAME", help="the adapter to export when LOTR_DIR is a zoo")
    _dtype_flag(export, "the LoRA factors written")
    _common(export)

    zoo = sub.add_parser("zoo", help="many LoRAs of one base in one shared Tucker-2 basis", description="LoRA zoos")
    zoo_sub = zoo.add_subparsers(dest="zoo_command", metavar="ZOO_COMMAND", required=True, help="compress or add")
    compress = _command(
        zoo_sub, "compress", "compress PEFT LoRA (or LoTR) folders of one base into a zoo", _cmd_zoo_compress
    )
    compress.add_argument(
        "paths", type=Path, nargs="+", metavar="SOURCE... OUT_DIR",
        help="the adapter folders, then the zoo folder to write",
    )  # fmt: skip
    compress.add_argument(
        "--names", action=_ListAction, nargs="+", metavar="A,B,…", help="adapter names (folder names)"
    )
    _rank_flags(
        compress, "Tucker ranks of every group, shared by all adapters (default: exact, lossless)",
        "keep this fraction of each group's squared singular values, over all adapters",
    )  # fmt: skip
    _calibration_flags(compress, heal_factors=False)
    compress.add_argument(
        "--fairness", choices=["relative", "none"], default="relative",
        help="relative: each adapter counts by its error relative to its own size; none: by its absolute error",
    )  # fmt: skip
    compress.add_argument(
        "--residual-rank", action="append", metavar="S|NAME=S",
        help="a private residual of rank S beside the shared basis, for every adapter or (NAME=S, repeated) "
        "the ones named; its parameters count in the zoo's size",
    )  # fmt: skip
    _common(compress)
    add = _command(zoo_sub, "add", "fold a new adapter into a zoo (projected onto its basis)", _cmd_zoo_add)
    add.add_argument("zoo_dir", type=Path, metavar="ZOO_DIR", help="the zoo folder, rewritten in place")
    add.add_argument("source", type=Path, metavar="LORA_DIR", help="a PEFT LoRA (or LoTR) folder for the same base")
    add.add_argument("--name", metavar="NAME", help="the adapter's name (default: the folder name)")
    add.add_argument("--refit", action="store_true", help="recompress the whole zoo instead of projecting")
    add.add_argument(
        "--residual-rank", type=_bounded_int(0), metavar="S",
        help="give the projected adapter a private residual of rank S beside the zoo's bases",
    )  # fmt: skip
    _rank_flags(add, "with --refit: the zoo's new rank (default: its current one)", "with --refit: energy kept")
    _common(add, None)

    dec = _command(sub, "decompose", "decompose fine-tuned minus base weights into a LoTR adapter", _cmd_decompose)
    dec.add_argument("base_dir", type=Path, metavar="BASE_DIR", help="the base model folder (safetensors or .bin)")
    dec.add_argument("finetuned_dir", type=Path, metavar="FINETUNED_DIR", help="the fully fine-tuned model folder")
    dec.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="the LoTR adapter folder to write")
    dec.add_argument(
        "--target-modules", type=parse_targets, required=True, metavar="NAMES",
        help="module name suffixes, comma-separated (q_proj,v_proj), or re:REGEX",
    )  # fmt: skip
    _rank_flags(
        dec, "Tucker ranks of every group (default: full rank, exact)",
        "keep this fraction of each group's squared norm, e.g. 0.9",
    )  # fmt: skip
    dec.add_argument("--dtype", choices=["float32", "float64"], default="float32", help="compute dtype")
    dec.add_argument(
        "--power-iters", type=_bounded_int(0), default=1, metavar="N",
        help="power iterations of the randomized route (large d), one pass over the weights each",
    )  # fmt: skip
    dec.add_argument("--save-changed-modules", action="store_true", help="keep other changed tensors (head, norms)")
    _calibration_flags(dec, heal_factors=False, heal=False)
    dec.add_argument(
        "--export-lora", nargs="?", const="", default=None, metavar="LORA_DIR",
        help="also write the PEFT LoRA form to LORA_DIR (default OUT_DIR-lora)",
    )  # fmt: skip
    _common(dec, "replace existing outputs")

    logs = _command(sub, "tb2parquet", "a tree of TensorBoard runs into one zstd parquet file", _cmd_tb2parquet)
    logs.add_argument("log_dir", type=Path, metavar="LOG_DIR", help="the root of the runs; each event folder is a run")
    logs.add_argument("out", type=Path, metavar="OUT.parquet", help="the parquet file to write")
    logs.add_argument(
        "--names", nargs="+", action=_ListAction, metavar="A,B,…",
        help="column names of the path segments, outermost first, comma-separated",
    )  # fmt: skip
    logs.add_argument("--tags", type=_regex, metavar="REGEX", help="keep only tags matching this regular expression")
    logs.add_argument(
        "--index", nargs="+", action=_ListAction, metavar="A,B,…",
        help="index columns, comma-separated (default: segments, tag, step, seed)",
    )  # fmt: skip
    logs.add_argument("--wall-time", action="store_true", help="keep the wall_time column")
    logs.add_argument("--jobs", type=_bounded_int(1), default=os.cpu_count() or 1, metavar="N", help="reader processes")
    logs.add_argument("--strict", action="store_true", help="fail on a corrupt or truncated event file")
    _common(logs)

    inspect = _command(
        sub, "inspect", "groups, shapes, ranks, params and dtype of a LoTR or PEFT LoRA folder", _cmd_inspect
    )
    inspect.add_argument("dir", type=Path, metavar="DIR", help="a LoTR adapter or PEFT LoRA folder")
    _common(inspect, None)
    return parser


def _check_args(args: argparse.Namespace) -> None:
    """Checks across flags, before any work starts; errors come from the command's own parser."""
    _check_calibration(args)
    if args.command == "tb2parquet":
        from ..jobs.logs import check_arguments

        try:
            check_arguments(args.names, args.tags, args.index)
        except ValueError as exc:
            args.parser.error(f"{exc}")


def _parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """``parser.parse_args(argv)``; the deprecation warnings of old flag forms print as one line each."""
    words = sys.argv[1:] if argv is None else list(argv)
    commands = next(a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    command = next((w for w in words if not w.startswith("-")), None)
    show_warning = warnings.showwarning
    warnings.showwarning = _warning_line(f"tensorlotr {command}" if command in commands else "tensorlotr")
    try:
        return parser.parse_args(argv)
    finally:
        warnings.showwarning = show_warning


def _print(result: Result, args: argparse.Namespace) -> None:
    text = result.to_json() if getattr(args, "json", False) else result.text()
    if sys.stdout is None:  # `tensorlotr ... >&-`: the report has nowhere to go
        if args.command == "inspect":  # the report is all that inspect makes
            raise OSError("stdout is closed: the report cannot be printed")
        print(f"tensorlotr {args.command}: warning: stdout is closed; the report is not printed", file=sys.stderr)
        return
    print(text)


def _one_line(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, OSError) and exc.filename is not None and str(exc.filename) not in text:
        text = f"{exc.filename}: {text}"
    return " ".join(text.split())


def _on_sigterm(_signum: int, _frame: FrameType | None) -> None:
    raise Terminated


#: glibc's ``mallopt`` parameter ``M_MMAP_THRESHOLD`` and the value the program sets.
_M_MMAP_THRESHOLD, _LARGE_BUFFER = -3, 1 << 20


def _return_large_buffers() -> None:
    """Have freed buffers of 1 MiB and more go back to the system at once (glibc; a no-op elsewhere).

    glibc raises its mmap threshold after the first large free; buffers up to 32 MiB then come
    from the heap and stay resident between long-lived tensors. Fixing the threshold keeps a
    long job's peak memory near what it holds (``bench/zoo_bench.py``: 100 LoRAs of Llama-2-7B
    shape in 1.5 GiB). Python API users get the same with the environment variable
    ``MALLOC_MMAP_THRESHOLD_=1048576``.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, _LARGE_BUFFER)
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        pass


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code.

    ``argv`` defaults to ``sys.argv[1:]``, as the ``tensorlotr`` program runs it: Ctrl-C and
    SIGTERM are then ignored once it returns, while the interpreter shuts down. The report goes
    to stdout (``--json`` for JSON); errors are one line on stderr, ``tensorlotr COMMAND: error: …``.
    A signal that arrives once every output is in place (during the final swap, which holds
    signals until it is done) is reported, and the exit code is 0: the output is complete.

    Examples
    --------
    ``my-lora/`` holds a PEFT LoRA of rank 4 on ``q_proj`` and ``v_proj`` of a 2-layer model
    of hidden size 32:

    >>> main(["inspect", "my-lora"])
    my-lora: peft-lora adapter
    group   layers  shape  rank  params  dtype
    ------  ------  -----  ----  ------  -------
    q_proj       2  32x32  4x4      512  float32
    v_proj       2  32x32  4x4      512  float32
    total adapter params: 1,024
    0
    >>> main(["convert", "my-lora", "my-lora/out"])  # an output inside the input: the input is at fault
    2
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no command reaches the network
    _return_large_buffers()
    parser = build_parser()
    args = _parse(parser, argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    _check_args(args)
    prog = f"tensorlotr {args.command}"
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if _is_main_thread() else None
    show_warning, warnings.showwarning = warnings.showwarning, _warning_line(prog)
    from ..files.atomic import written_outputs

    written_before = len(written_outputs())
    try:
        _print(args.func(args), args)
        if sys.stdout is not None:
            sys.stdout.flush()
        return 0
    except BrokenPipeError:  # `tensorlotr inspect DIR | head -2`: the reader left, nothing to report
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except (KeyboardInterrupt, Terminated) as exc:
        word, code = ("interrupted", 130) if isinstance(exc, KeyboardInterrupt) else ("terminated", 143)
        complete = _complete_outputs(args, written_outputs()[written_before:])
        if complete:  # the signal came once the work was done: report that, truthfully
            print(f"{prog}: {word} after writing {', '.join(complete)}, which is complete", file=sys.stderr)
            return 0
        print(f"{prog}: {word}", file=sys.stderr)
        return code
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError) as exc:
        _report(prog, exc, args)
        return 2
    except Exception as exc:
        _report(prog, exc, args)
        return 1
    finally:
        warnings.showwarning = show_warning
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if argv is None and _is_main_thread():  # the program ends: a late signal must not print a traceback
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _complete_outputs(args: argparse.Namespace, written: list[str]) -> list[str]:
    """The command's outputs when every one of them is among ``written`` (put in place), else []."""
    if args.command == "zoo":
        outputs = [args.paths[-1]] if args.zoo_command == "compress" else [args.zoo_dir]
    elif args.command == "decompose" and args.export_lora is not None:
        lora = Path(args.export_lora) if args.export_lora else args.out_dir.with_name(args.out_dir.name + "-lora")
        outputs = [args.out_dir, lora]
    else:
        outputs = [p for p in (getattr(args, k, None) for k in ("out_dir", "out", "output")) if p is not None][:1]
    done = set(written)
    for output in outputs:
        path = Path(output)
        if not {os.path.join(os.path.realpath(path.parent), path.name), os.path.realpath(path)} & done:
            return []
    return [str(p) for p in outputs]


def _warning_line(prog: str) -> Callable[..., None]:
    """``warnings.showwarning`` for the command line: one line, ``tensorlotr CMD: warning: …``."""

    def show(message: Warning | str, *_args: Any, **_kwargs: Any) -> None:
        print(f"{prog}: warning: {' '.join(str(message).split())}", file=sys.stderr)

    return show


def _report(prog: str, exc: BaseException, args: argparse.Namespace) -> None:
    if getattr(args, "debug", False):
        import traceback

        traceback.print_exception(exc, file=sys.stderr)
    print(f"{prog}: error: {_one_line(exc)}", file=sys.stderr)


def _is_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
