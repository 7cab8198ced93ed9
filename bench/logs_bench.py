"""tb2parquet against a plain sequential tbparse loop, and the size of the result.

    python bench/logs_bench.py [--runs 200] [--tags 10] [--steps 1000] [--workdir DIR]

Builds ``<dataset>/<model>/<method>/<lr>/<rank>/<seed>/`` runs with torch's SummaryWriter,
then times (a) a sequential loop of ``tbparse.SummaryReader(file).scalars`` plus a concat,
the obvious script, and (b) ``tensorlotr.jobs.logs.tb2parquet`` with 2 reader processes,
including typing the columns and writing zstd parquet.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import machine

NAMES = ["dataset", "model", "method", "lr", "rank", "seed"]


def run_parts(n_runs: int) -> list[tuple[str, ...]]:
    parts = []
    for i in range(n_runs):
        model = ("roberta", "gpt2", "llama", "t5")[i % 4]
        method = ("lotr", "lora")[(i // 4) % 2]
        lr = ("1e-05", "3e-05", "0.0001", "0.0003", "0.001")[(i // 8) % 5]
        parts.append(("glue", model, method, lr, str(2 ** (1 + (i // 40) % 5)), str(i)))
    return parts


def curves_for(kind: str, index: int, n_tags: int, n_steps: int) -> np.ndarray:
    """(n_tags, n_steps) values: random walks (incompressible low bits) or smooth schedules."""
    rng = np.random.default_rng(index)
    if kind == "random-walk":
        return np.cumsum(rng.standard_normal((n_tags, n_steps)) * 0.01, axis=1)
    steps = np.arange(n_steps)
    shapes = [
        lambda: 1e-4 * 0.5 * (1 + np.cos(np.pi * steps / n_steps)),  # cosine learning-rate schedule
        lambda: np.floor(steps / 100) / 10,  # epoch counter
        lambda: np.round(0.5 + 0.4 * (1 - np.exp(-steps / 300)), 3),  # accuracy to 3 digits
        lambda: 2.0 * np.exp(-steps / 400) + 0.3,  # smooth loss
    ]
    return np.stack([shapes[(index + t) % len(shapes)]() for t in range(n_tags)])


def write_run(args: tuple[Path, tuple[str, ...], int, int, int, str]) -> None:
    from torch.utils.tensorboard import SummaryWriter

    root, parts, index, n_tags, n_steps, kind = args
    writer = SummaryWriter(str(root.joinpath(*parts)), flush_secs=3600, max_queue=10_000)
    curves = curves_for(kind, index, n_tags, n_steps)
    for step in range(n_steps):
        for t in range(n_tags):
            writer.add_scalar(f"metric_{t}", float(curves[t, step]), step)
    writer.close()


def sequential_tbparse(root: Path) -> pd.DataFrame:
    from tbparse import SummaryReader

    frames = []
    for path in sorted(root.rglob("*tfevents*")):
        frame = SummaryReader(str(path)).scalars
        frame["run"] = str(path.parent.relative_to(root))
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--tags", type=int, default=10)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--curves", choices=["random-walk", "smooth"], default="random-walk")
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="tensorlotr-logs-"))
    work.mkdir(parents=True, exist_ok=True)
    root = work / "logs"
    try:
        start = time.perf_counter()
        jobs = [(root, p, i, args.tags, args.steps, args.curves) for i, p in enumerate(run_parts(args.runs))]
        with ProcessPoolExecutor(2) as pool:
            list(pool.map(write_run, jobs, chunksize=8))
        written = time.perf_counter() - start

        from tensorlotr.jobs.logs import tb2parquet

        start = time.perf_counter()
        baseline = sequential_tbparse(root)
        t_seq = time.perf_counter() - start
        start = time.perf_counter()
        summary = tb2parquet(root, work / "sweep.parquet", NAMES, jobs=2, force=True)
        t_ours = time.perf_counter() - start
        assert summary.rows == len(baseline)
        print(f"Machine: {machine()}")
        print(f"{args.runs} runs x {args.tags} tags x {args.steps} steps = {summary.rows:,} scalars, "
              f"{args.curves} curves (written by SummaryWriter in {written:.0f} s)\n")  # fmt: skip
        print("| | seconds | speed-up |")
        print("|---|---|---|")
        print(f"| sequential tbparse loop (DataFrame only, no typing, no file) | {t_seq:.1f} | 1.00x |")
        print(f"| `tb2parquet --jobs 2` (typed columns, zstd parquet written) | {t_ours:.1f} | {t_seq / t_ours:.2f}x |")
        print(f"\nevent files: {summary.input_bytes / 2**20:.1f} MiB; parquet: {summary.output_bytes / 2**20:.2f} MiB; "
              f"{summary.ratio:.0f}x smaller")  # fmt: skip
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
