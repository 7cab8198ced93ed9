"""A sweep's TensorBoard runs -> one parquet file -> a results table with pandas.

    .venv/bin/python examples/logs_to_parquet.py --workdir /tmp/logs

Writes a small sweep of TensorBoard runs laid out as
``runs/<dataset>/<model>/<method>/<lr>/<rank>/<seed>/events.out.tfevents.*`` (the curves
are synthetic: a decaying loss and a rising accuracy per run, no training), converts the
tree with ``tb2parquet``, reads the parquet file back and prints the final accuracy per
method, learning rate and rank, averaged over seeds. The same as the command

    tensorlotr tb2parquet WORKDIR/runs WORKDIR/sweep.parquet --names dataset,model,method,lr,rank,seed
"""

from __future__ import annotations

import argparse
import itertools
import math
import tempfile
from pathlib import Path

import pandas as pd
from torch.utils.tensorboard import SummaryWriter

from tensorlotr.jobs.logs import tb2parquet

NAMES = ["dataset", "model", "method", "lr", "rank", "seed"]
METHODS, LRS, RANKS, SEEDS = ("lora", "lotr"), ("1e-4", "3e-4"), (8, 32), (0, 1, 2)
STEPS = 50


def write_sweep(root: Path) -> int:
    """One run per (method, lr, rank, seed); returns the number of runs."""
    runs = 0
    for method, lr, rank, seed in itertools.product(METHODS, LRS, RANKS, SEEDS):
        rate = float(lr) * 1e4 * (1 + rank / 64) * (1 + 0.1 * seed)  # synthetic: the same for both methods
        with SummaryWriter(str(root / "sst2" / "minilm" / method / lr / str(rank) / str(seed))) as writer:
            for step in range(STEPS):
                writer.add_scalar("train/loss", 0.7 * math.exp(-rate * step / 20) + 0.01 * seed, step)
                if step % 10 == 9:
                    writer.add_scalar("eval/accuracy", 0.5 + 0.4 * (1 - math.exp(-rate * step / 20)), step)
        runs += 1
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="lotr-logs-"))
    if (work / "runs").exists():
        parser.error(f"{work / 'runs'} exists; give a new --workdir")  # new event files would join the old runs
    print(f"wrote {write_sweep(work / 'runs')} runs under {work / 'runs'}")

    summary = tb2parquet(work / "runs", work / "sweep.parquet", NAMES, force=True)
    print(summary.text())

    curves = pd.read_parquet(work / "sweep.parquet")  # index: dataset, model, method, lr, rank, tag, step, seed
    accuracy = curves.xs("eval/accuracy", level="tag")["value"]
    final = accuracy[accuracy.index.get_level_values("step") == STEPS - 1]
    table = final.groupby(level=["method", "lr", "rank"], observed=True).mean().unstack("rank")
    print("final eval/accuracy of the synthetic curves, mean over seeds (columns: rank)")
    print(table.round(3).to_string())


if __name__ == "__main__":
    main()
