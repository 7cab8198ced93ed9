"""Parameter-efficiency study on SST-2: LoTR against LoRA and VeRA at equal budget.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/sst2_study.py --data ../shared/data/sst2 --out bench/results/sst2

Every method fine-tunes the packaged all-MiniLM-L6-v2 (6 layers, hidden size 384) on the
same examples: ``--steps`` steps of ``--batch`` sentences from ``train.tsv`` (the sample
and its order depend on the seed only), adapters on ``query`` and ``value``, the classifier
head trained in full, AdamW without weight decay, a linear schedule with 10% warm-up, bf16
autocast (CPU or CUDA). ``dev.tsv`` is split once, at random, into two halves: the
learning rate of each method is chosen on the *tune* half with seed 0 over one grid
(``--lrs``, grown by 2.5x at most ``--extend`` times where its best rate is its largest),
and the chosen rate is run with every seed (``--seeds``) and reported on the
other, *held-out* half, so the reported accuracy is not the one the rate was chosen on.

Methods (``--methods`` picks some by name, ``--list`` shows them):

- PEFT LoRA at r = 1, 2, 8 and PEFT VeRA (r = 256), with PEFT's defaults (``lora_alpha=8``);
- LoTR at rank 4, 8, 16, with a tensor per target (``by_name``) or one tensor shared by
  query and value (``shared``), with the library's defaults;
- LoTR trained as full corrections with the projected optimizer ``LoTRAdamW``;
- the LoRA r = 8 runs converted to LoTR rank 4, 8, 16 with no retraining;
- LoTR started from a LoRA r = 8 warm-up (the first 20% of the steps), converted in memory;
- ablations of LoTR rank 8: the factors' learning rate relative to the cores', the scale
  rule (alpha / r or alpha / sqrt(r)), the factors' and cores' initialisation, asymmetric ranks.

Outputs, in ``--out``: ``runs.csv`` (one row per run; the study resumes from it and skips
runs already there), ``summary.csv`` and ``summary.md`` (mean and standard deviation over
seeds at each method's chosen rate, and paired differences against LoRA and default LoTR)
and ``accuracy_vs_params.png``. ``--report`` rewrites them from ``runs.csv`` without
training; ``--quick`` is the smoke version (30 steps, 400 dev sentences, one seed and rate).
"""

from __future__ import annotations

import argparse
import csv
import math
import multiprocessing as mp
import os
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

TARGETS = ["query", "value"]
HEAD = ["classifier"]
CSV_FIELDS = [
    "method", "family", "kind", "config", "adapter_params", "lr", "seed",
    "dev_accuracy", "tune_accuracy", "train_seconds", "steps", "batch",
]  # fmt: skip
WARMUP_FRACTION = 0.2  # the LoRA warm-up's share of the steps


# --- the methods ----------------------------------------------------------------------
@dataclass(frozen=True)
class Method:
    """One trained configuration: ``kind`` says how it is built, ``options`` what is set."""

    name: str
    family: str
    kind: str  # lora | vera | lotr | projected | warmup
    options: tuple[tuple[str, Any], ...] = ()
    ablation: bool = False

    @property
    def opts(self) -> dict[str, Any]:
        return dict(self.options)

    @property
    def config(self) -> str:
        """Every setting that defines the run, so that a changed default is a new CSV key."""
        return ",".join(f"{k}={v}" for k, v in self.options)


def lotr_options(rank: int | tuple[int, int], groups: str = "by_name", **overrides: Any) -> tuple[tuple[str, Any], ...]:
    """A LoTR configuration spelled out in full: the library's defaults, then ``overrides``."""
    import tensorlotr as tlr

    r_out, r_in = (rank, rank) if isinstance(rank, int) else rank
    defaults = tlr.LoTRConfig()
    options = {
        "rank": f"{r_out}x{r_in}",
        "groups": groups,
        "alpha": defaults.alpha,
        "scale": "alpha/r",
        "init": defaults.init,
        "factor_lr_ratio": 1.0,
    }
    options.update(overrides)
    return tuple(options.items())


def methods() -> list[Method]:
    """Every configuration of the study, main methods first, then the ablations."""
    out = [Method(f"LoRA r={r}", "LoRA", "lora", (("r", r), ("alpha", 8))) for r in (1, 2, 8)]
    out.append(Method("VeRA r=256", "VeRA", "vera", (("r", 256), ("d_initial", 0.1))))
    for groups, family in (("by_name", "LoTR, a tensor per target"), ("shared", "LoTR, query+value shared")):
        out += [Method(f"LoTR {r} {groups}", family, "lotr", lotr_options(r, groups)) for r in (4, 8, 16)]
    out.append(Method("LoTR 8 projected", "LoTR, projected optimizer", "projected", lotr_options(8)))
    out.append(Method("LoTR 8 from LoRA warm-up", "LoTR from a LoRA warm-up", "warmup", lotr_options(8)))
    ablate = "LoTR 8 ablation"
    for ratio in (1.0, 4.0, 0.25, 1 / 16):
        out.append(Method(f"LoTR 8 factor lr x{ratio:g}", ablate, "lotr", lotr_options(8, factor_lr_ratio=ratio), True))
    out.append(Method("LoTR 8 init svd", ablate, "lotr", lotr_options(8, init="svd"), True))
    out.append(Method("LoTR 8 init from gradients", ablate, "lotr", lotr_options(8, init="gradient"), True))
    out.append(Method("LoTR 8 init normal", ablate, "lotr", lotr_options(8, init="normal"), True))
    out.append(Method("LoTR 8 init U=0 G=I", ablate, "lotr", lotr_options(8, init="U0-Geye"), True))
    for rank in ((12, 4), (4, 12)):
        out.append(Method(f"LoTR {rank[0]}x{rank[1]}", ablate, "lotr", lotr_options(rank), True))
    for rank in (4, 16):
        out.append(
            Method(f"LoTR {rank} scale alpha/sqrt(r)", ablate, "lotr", lotr_options(rank, scale="alpha/sqrt(r)"), True)
        )
    names = [m.name for m in out]
    assert len(set(names)) == len(names)
    return out


DEFAULT_LOTR = "LoTR 8 by_name"  # the library's defaults at rank 8: the reference of the comparisons


def conversion_name(rank: int) -> str:
    return f"LoRA r=8 -> LoTR {rank}"


CONVERSION_RANKS = (4, 8, 16)


# --- data -----------------------------------------------------------------------------
@dataclass
class Data:
    """Tokenised training sample of one seed, and the two dev halves."""

    tokenizer: Any
    train: list[tuple[str, int]]
    tune: list[tuple[str, int]]
    held_out: list[tuple[str, int]]


def load_data(folder: Path, dev_limit: int | None) -> tuple[list[tuple[str, int]], list, list]:
    from tensorlotr.data import read_tsv

    for name in ("train.tsv", "dev.tsv"):
        if not (folder / name).is_file():
            raise SystemExit(f"{folder / name}: no such file; --data needs a folder with train.tsv and dev.tsv")
    train = read_tsv(folder / "train.tsv")
    dev = read_tsv(folder / "dev.tsv")
    random.Random(1234).shuffle(dev)
    if dev_limit is not None:
        dev = dev[:dev_limit]
    half = len(dev) // 2
    return train, dev[:half], dev[half:]


def training_batches(tokenizer: Any, train: list, seed: int, steps: int, batch: int) -> list[dict[str, torch.Tensor]]:
    """``steps`` padded batches: a seeded sample, grouped by length within chunks of 20 batches.

    Grouping by length (as ``Trainer``'s ``group_by_length``) cuts padding; the batches'
    order is shuffled again, so a method does not see the short sentences first.
    """
    rng = random.Random(seed)
    rows = [train[i] for i in rng.sample(range(len(train)), min(len(train), steps * batch))]
    while len(rows) < steps * batch:  # a small file: repeat it
        rows += rows[: steps * batch - len(rows)]
    chunk = 20 * batch
    batches = []
    for start in range(0, len(rows), chunk):
        part = sorted(rows[start : start + chunk], key=lambda r: len(r[0]))
        batches += [part[i : i + batch] for i in range(0, len(part), batch)]
    rng.shuffle(batches)
    return [_encode(tokenizer, b) for b in batches[:steps]]


def _encode(tokenizer: Any, rows: list[tuple[str, int]]) -> dict[str, torch.Tensor]:
    enc = tokenizer([s for s, _ in rows], padding=True, truncation=True, max_length=64, return_tensors="pt")
    return {**enc, "labels": torch.tensor([y for _, y in rows])}


@torch.no_grad()
def accuracy(model: Any, tokenizer: Any, rows: list[tuple[str, int]], device: torch.device) -> float:
    """Accuracy on ``rows`` under the same autocast as training; sorted by length to cut padding."""
    model.eval()
    ordered = sorted(rows, key=lambda r: len(r[0]))
    correct = 0
    for start in range(0, len(ordered), 128):
        enc = _encode(tokenizer, ordered[start : start + 128])
        labels = enc.pop("labels").to(device)
        with autocast(device):
            logits = model(**{k: v.to(device) for k, v in enc.items()}).logits
        correct += int((logits.argmax(-1) == labels).sum())
    model.train()
    return correct / len(rows)


def autocast(device: torch.device) -> Any:
    return torch.autocast(device.type, dtype=torch.bfloat16)


# --- building the adapted models ------------------------------------------------------
def base_model(seed: int, model_dir: Path | None) -> tuple[Any, Any]:
    from tensorlotr.demo import default_model_dir, load_classifier

    return load_classifier(model_dir or default_model_dir(), seed=seed)


def adapter_params(model: Any) -> int:
    """Trainable parameters outside the classifier head."""
    return sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "classifier" not in n)


def param_groups(model: Any, lr: float, factor_lr_ratio: float = 1.0) -> list[dict[str, Any]]:
    """AdamW groups: LoTR factors at ``lr * factor_lr_ratio``, everything else at ``lr``."""
    factors = [p for n, p in model.named_parameters() if p.requires_grad and "lotr_factors" in n]
    others = [p for n, p in model.named_parameters() if p.requires_grad and "lotr_factors" not in n]
    groups = [{"params": others, "lr": lr, "base_lr": lr}]
    if factors:
        groups.append({"params": factors, "lr": lr * factor_lr_ratio, "base_lr": lr * factor_lr_ratio})
    return groups


def build_lotr(model: Any, opts: dict[str, Any]) -> Any:
    import tensorlotr as tlr

    r_out, r_in = (int(x) for x in str(opts["rank"]).split("x"))
    r = min(r_out, r_in)
    alpha = float(opts["alpha"]) * (math.sqrt(r) if opts["scale"] == "alpha/sqrt(r)" else 1.0)
    init = opts["init"] if opts["init"] in ("zeros", "normal", "svd") else "zeros"
    config = tlr.LoTRConfig(
        rank=(r_out, r_in), alpha=alpha, target_modules=TARGETS, groups=opts["groups"], init=init, modules_to_save=HEAD
    )
    lotr = tlr.get_lotr_model(model, config)
    if opts["init"] == "U0-Geye":  # LoRA's pattern: the output side starts at zero, the rest does not
        with torch.no_grad():
            for factors in lotr.lotr_factors.values():
                factors.out_factor.zero_()
            for _, layer in lotr.lotr_layers():
                layer.lotr_core.copy_(torch.eye(r_out, r_in))
    return lotr


GRADIENT_INIT_BATCHES = 4


def gradient_init(lotr: Any, batches: list, device: torch.device) -> None:
    """Factors from the HOSVD of each group's stacked full-weight gradients, cores zero.

    The loss gradients of the frozen weights over the first ``GRADIENT_INIT_BATCHES``
    training batches, stacked per group as ``(L, d_out, d_in)``; ``U`` and ``V`` become
    the leading singular vectors of its unfoldings (:func:`tensorlotr.tucker2`), the
    directions the first steps of full fine-tuning would take. The update still starts at zero.
    """
    import tensorlotr as tlr

    weights = {
        name: lotr.base_model.get_submodule(name).base_layer.weight for g in lotr.groups.values() for name in g.modules
    }
    for w in weights.values():
        w.requires_grad_(True)
    for batch in batches[:GRADIENT_INIT_BATCHES]:
        with autocast(device):
            loss = lotr(**{k: v.to(device) for k, v in batch.items()}).loss
        loss.backward()
    with torch.no_grad():
        for group, layout in lotr.groups.items():
            stack = torch.stack([weights[n].grad.to(torch.float64) for n in layout.modules])
            tucker = tlr.tucker2(stack, tuple(layout.rank))
            start = lotr.tucker(group)
            lotr.load_tucker(group, tlr.Tucker2(torch.zeros_like(start.core), tucker.out_factor, tucker.in_factor))
    for w in weights.values():
        w.requires_grad_(False)
        w.grad = None
    lotr.zero_grad(set_to_none=True)


def build_peft(model: Any, kind: str, opts: dict[str, Any]) -> Any:
    import peft

    if kind == "vera":
        config = peft.VeraConfig(r=opts["r"], d_initial=opts["d_initial"], target_modules=TARGETS, modules_to_save=HEAD)
    else:
        config = peft.LoraConfig(r=opts["r"], lora_alpha=opts["alpha"], target_modules=TARGETS, modules_to_save=HEAD)
    return peft.get_peft_model(model, config)


class DenseDelta(torch.nn.Module):
    """A frozen linear layer plus a full trainable correction ``delta`` (d_out, d_in)."""

    def __init__(self, base: torch.nn.Linear) -> None:
        super().__init__()
        self.base = base
        self.delta = torch.nn.Parameter(torch.zeros_like(base.weight))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.base.weight + self.delta, self.base.bias)


def build_projected(model: Any, opts: dict[str, Any], lr: float) -> tuple[Any, Any, int]:
    """Full corrections of query and value, stepped by ``LoTRAdamW`` at Tucker-2 rank ``opts['rank']``."""
    from tensorlotr.optim import LoTRAdamW, OptimizerList

    model.requires_grad_(False)
    stacks: dict[str, list[torch.nn.Parameter]] = {t: [] for t in TARGETS}
    for name, module in list(model.named_modules()):
        leaf = name.rsplit(".", 1)[-1]
        if leaf in stacks and isinstance(module, torch.nn.Linear):
            wrapped = DenseDelta(module)
            model.set_submodule(name, wrapped)
            stacks[leaf].append(wrapped.delta)
    head = model.get_submodule(HEAD[0])
    head.requires_grad_(True)
    r_out, r_in = (int(x) for x in str(opts["rank"]).split("x"))
    groups = [{"params": ps, "base_lr": lr} for ps in stacks.values()]
    projected = LoTRAdamW(groups, rank=(r_out, r_in), lr=lr, weight_decay=0.0)
    plain = torch.optim.AdamW([{"params": list(head.parameters()), "base_lr": lr}], lr=lr, weight_decay=0.0)
    n_layers, (d_out, d_in) = len(stacks[TARGETS[0]]), stacks[TARGETS[0]][0].shape
    lotr_params = len(stacks) * (d_out * r_out + d_in * r_in + n_layers * r_out * r_in)
    return model, OptimizerList(projected, plain), lotr_params


def lora_to_lotr(peft_model: Any, opts: dict[str, Any]) -> Any:
    """Convert a PEFT LoRA model in memory with :meth:`tensorlotr.LoTRModel.from_peft_model`.

    Each target's stack of ``scale * B A`` becomes a Tucker-2 (HOSVD) at ``opts``'s rank and
    groups; the base model keeps LoRA's trained head.
    """
    import tensorlotr as tlr

    r_out, r_in = (int(x) for x in str(opts["rank"]).split("x"))
    config = tlr.LoTRConfig(
        rank=(r_out, r_in), alpha=float(opts["alpha"]), target_modules=TARGETS, groups=opts["groups"],
        modules_to_save=HEAD,
    )  # fmt: skip
    return tlr.LoTRModel.from_peft_model(peft_model, config)


# --- one run --------------------------------------------------------------------------
@dataclass
class Settings:
    data: Path
    steps: int
    batch: int
    dev_limit: int | None
    model_dir: Path | None
    threads: int


_DATA: dict[str, Any] = {}


def _data(settings: Settings) -> tuple[list, list, list]:
    if "rows" not in _DATA:
        _DATA["rows"] = load_data(settings.data, settings.dev_limit)
    return _DATA["rows"]


def lr_factor(step: int, total: int) -> float:
    """Linear schedule with 10% warm-up, as ``get_linear_schedule_with_warmup``."""
    warm = max(1, int(0.1 * total))
    if step < warm:
        return (step + 1) / warm
    return max(0.0, (total - step) / max(1, total - warm))


def train_steps(model: Any, optimizer: Any, batches: list, steps: range, total: int, device: torch.device) -> None:
    model.train()
    for step in steps:
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * lr_factor(step, total)
        batch = {k: v.to(device) for k, v in batches[step].items()}
        with autocast(device):
            loss = model(**batch).loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {float(loss)} at step {step}")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def run_one(method: Method, lr: float, seed: int, settings: Settings) -> list[dict[str, Any]]:
    """Train ``method`` at ``lr`` with ``seed``; its CSV row (and for LoRA r=8, the conversions' rows)."""
    torch.set_num_threads(settings.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    train, tune, held_out = _data(settings)
    tokenizer, model = base_model(seed, settings.model_dir)
    batches = training_batches(tokenizer, train, seed, settings.steps, settings.batch)
    torch.manual_seed(seed)
    opts = method.opts
    start = time.perf_counter()
    diverged = False
    try:
        if method.kind in ("lora", "vera"):
            model = build_peft(model, method.kind, opts).to(device)
            params = adapter_params(model)
            optimizer = torch.optim.AdamW(param_groups(model, lr), lr=lr, weight_decay=0.0)
            train_steps(model, optimizer, batches, range(settings.steps), settings.steps, device)
        elif method.kind == "lotr":
            model = build_lotr(model, opts).to(device)
            params = adapter_params(model)
            if opts["init"] == "gradient":
                gradient_init(model, batches, device)
            optimizer = torch.optim.AdamW(
                param_groups(model, lr, float(opts["factor_lr_ratio"])), lr=lr, weight_decay=0.0
            )
            train_steps(model, optimizer, batches, range(settings.steps), settings.steps, device)
        elif method.kind == "projected":
            model, optimizer, params = build_projected(model, opts, lr)
            model.to(device)
            train_steps(model, optimizer, batches, range(settings.steps), settings.steps, device)
        elif method.kind == "warmup":
            warm = max(1, int(WARMUP_FRACTION * settings.steps))
            lora = build_peft(model, "lora", {"r": 8, "alpha": 8}).to(device)
            optimizer = torch.optim.AdamW(param_groups(lora, lr), lr=lr, weight_decay=0.0)
            train_steps(lora, optimizer, batches, range(warm), settings.steps, device)
            model = lora_to_lotr(lora, opts).to(device)
            params = adapter_params(model)
            optimizer = torch.optim.AdamW(
                param_groups(model, lr, float(opts["factor_lr_ratio"])), lr=lr, weight_decay=0.0
            )
            train_steps(model, optimizer, batches, range(warm, settings.steps), settings.steps, device)
        else:
            raise ValueError(f"unknown method kind {method.kind!r}")
    except FloatingPointError:
        diverged = True
        params = adapter_params(model) if method.kind != "projected" else 0
    seconds = time.perf_counter() - start

    def row(name: str, family: str, config: str, n: int, tune_acc: float, dev_acc: float, secs: float) -> dict:
        kind = method.kind if name == method.name else "conversion"
        return {
            "method": name, "family": family, "kind": kind, "config": config, "adapter_params": n,
            "lr": lr, "seed": seed, "dev_accuracy": round(dev_acc, 5), "tune_accuracy": round(tune_acc, 5),
            "train_seconds": round(secs, 1), "steps": settings.steps, "batch": settings.batch,
        }  # fmt: skip

    if diverged:  # scored as chance: the rate is too high for this method
        return [row(method.name, method.family, method.config, params, 0.5, 0.5, seconds)]
    rows = [
        row(
            method.name, method.family, method.config, params,
            accuracy(model, tokenizer, tune, device), accuracy(model, tokenizer, held_out, device), seconds,
        )
    ]  # fmt: skip
    if method.kind == "lora" and opts["r"] == 8:
        rows += conversions(model, tokenizer, tune, held_out, device, row)
    return rows


def conversions(
    peft_model: Any, tokenizer: Any, tune: list, held_out: list, device: torch.device, row: Callable
) -> list:
    """The trained LoRA r=8 converted to LoTR rank 4, 8, 16 (no retraining), each evaluated."""
    import copy

    out = []
    for rank in CONVERSION_RANKS:
        start = time.perf_counter()
        opts = dict(lotr_options(rank))
        lotr = lora_to_lotr(copy.deepcopy(peft_model), opts).to(device)
        seconds = time.perf_counter() - start
        config = "from=LoRA r=8," + ",".join(f"{k}={opts[k]}" for k in ("rank", "groups"))
        out.append(
            row(
                conversion_name(rank), "LoRA r=8 converted to LoTR", config, adapter_params(lotr),
                accuracy(lotr, tokenizer, tune, device), accuracy(lotr, tokenizer, held_out, device), seconds,
            )
        )  # fmt: skip
    return out


def _worker(job: tuple[Method, float, int, Settings]) -> list[dict[str, Any]]:
    import warnings

    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    return run_one(*job)


# --- the study: tune, then seeds; resumable -------------------------------------------
class RunLog:
    """``runs.csv``: rows appended as runs finish, read back to skip finished runs."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: list[dict[str, Any]] = []
        if path.is_file():
            with path.open(newline="") as handle:
                for raw in csv.DictReader(handle):
                    self.rows.append(_typed(raw))

    def done(self, method: Method, lr: float, seed: int) -> bool:
        return any(_same(r["lr"], lr) and r["seed"] == seed for r in self.of(method))

    def add(self, rows: list[dict[str, Any]]) -> None:
        new = not self.path.is_file()
        with self.path.open("a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS)
            if new:
                writer.writeheader()
            writer.writerows(rows)
            handle.flush()
            os.fsync(handle.fileno())
        self.rows += rows

    def of(self, method: Method) -> list[dict[str, Any]]:
        """The runs of ``method``'s configuration, under whichever name they were run."""
        return [r for r in self.rows if r["kind"] == method.kind and r["config"] == method.config]


def _typed(raw: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = dict(raw)
    for key in ("adapter_params", "seed", "steps", "batch"):
        out[key] = int(raw[key])
    for key in ("lr", "dev_accuracy", "tune_accuracy", "train_seconds"):
        out[key] = float(raw[key])
    return out


def _same(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9)


def best_lr(log: RunLog, method: Method, lrs: list[float], tune_seed: int) -> float | None:
    """The grid rate with the best tune-half accuracy at ``tune_seed``; None until all are run."""
    scores = {}
    for lr in lrs:
        hits = [r for r in log.of(method) if _same(r["lr"], lr) and r["seed"] == tune_seed]
        if not hits:
            return None
        scores[lr] = hits[0]["tune_accuracy"]
    return max(lrs, key=lambda lr: (scores[lr], -lr))


def run_jobs(jobs: list[tuple[Method, float, int, Settings]], log: RunLog, workers: int, label: str) -> None:
    from tqdm.auto import tqdm

    unique: dict[tuple[str, str, float, int], tuple[Method, float, int, Settings]] = {}
    for job in jobs:  # two names for one configuration run once
        unique.setdefault((job[0].kind, job[0].config, job[1], job[2]), job)
    jobs = list(unique.values())
    if not jobs:
        return
    bar = tqdm(total=len(jobs), desc=label, unit="run", file=sys.stderr)
    results: Iterator[list[dict[str, Any]]]
    if workers > 1:
        pool = mp.get_context("spawn").Pool(workers, maxtasksperchild=8)
        results = pool.imap_unordered(_worker, jobs)
    else:
        pool = None
        results = map(_worker, jobs)
    try:
        for rows in results:
            log.add(rows)
            first = rows[0]
            bar.set_postfix_str(f"{first['method']} lr={first['lr']:g} s{first['seed']}: {first['dev_accuracy']:.3f}")
            bar.update()
        if pool is not None:
            pool.close()
            pool.join()
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()


GRID_EXTENSION = 2.5  # a method whose best rate is the grid's largest is also tried at 2.5x that


def extended(
    grid: list[float], base: list[float], log: RunLog, method: Method, seed: int, limit: int
) -> list[float] | None:
    """``grid`` and a larger rate, if its best rate is its largest and it grew from ``base`` under ``limit`` times."""
    best = best_lr(log, method, grid, seed)
    if best is None or best != max(grid) or len(grid) - len(base) >= limit:
        return None
    return [*grid, round(max(grid) * GRID_EXTENSION, 8)]


def method_grids(chosen: list[Method], args: argparse.Namespace, log: RunLog) -> dict[str, list[float]]:
    """Each method's grid as far as runs.csv holds its extensions."""
    grids = {}
    for m in chosen:
        grid = list(args.lrs)
        while (longer := extended(grid, args.lrs, log, m, args.seeds[0], args.extend)) and log.done(
            m, longer[-1], args.seeds[0]
        ):
            grid = longer
        grids[m.name] = grid
    return grids


def study(
    chosen: list[Method], args: argparse.Namespace, settings: Settings, log: RunLog
) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Tune each method's rate on the grid (extended upwards where the best is its edge), then run the seeds."""
    tune_seed = args.seeds[0]
    grids = method_grids(chosen, args, log)
    for round_ in range(args.extend + 1):
        jobs = [(m, lr, tune_seed, settings) for m in chosen for lr in grids[m.name] if not log.done(m, lr, tune_seed)]
        run_jobs(jobs, log, args.workers, "tuning the learning rates" if round_ == 0 else "extending the grids")
        changed = False
        for m in chosen:
            longer = extended(grids[m.name], args.lrs, log, m, tune_seed, args.extend)
            if longer is not None:
                grids[m.name], changed = longer, True
        if not changed:
            break
    chosen_lr = {m.name: best_lr(log, m, grids[m.name], tune_seed) for m in chosen}
    seed_jobs = [
        (m, chosen_lr[m.name], seed, settings)
        for m in chosen
        for seed in args.seeds[1:]
        if not log.done(m, chosen_lr[m.name], seed)  # type: ignore[arg-type]
    ]
    run_jobs(seed_jobs, log, args.workers, "seeds at the chosen rates")
    return chosen_lr, grids  # type: ignore[return-value]


# --- the report -----------------------------------------------------------------------
@dataclass
class Line:
    method: str
    family: str
    params: int
    lr: float
    by_seed: dict[int, float] = field(default_factory=dict)
    seconds: list[float] = field(default_factory=list)
    edge: bool = False
    ablation: bool = False

    @property
    def accs(self) -> list[float]:
        return list(self.by_seed.values())

    @property
    def mean(self) -> float:
        return statistics.fmean(self.accs)

    @property
    def std(self) -> float:
        return statistics.stdev(self.accs) if len(self.accs) > 1 else 0.0


def summarise(
    chosen: list[Method],
    chosen_lr: dict[str, float],
    grids: dict[str, list[float]],
    log: RunLog,
    args: argparse.Namespace,
) -> list[Line]:
    lines = []
    for m in chosen:
        lr = chosen_lr[m.name]
        rows = list({r["seed"]: r for r in log.of(m) if _same(r["lr"], lr) and r["seed"] in args.seeds}.values())
        edge = lr in (min(grids[m.name]), max(grids[m.name]))
        line = Line(m.name, m.family, rows[0]["adapter_params"], lr, edge=edge, ablation=m.ablation)
        line.by_seed = {r["seed"]: r["dev_accuracy"] for r in rows}
        line.seconds = [r["train_seconds"] for r in rows]
        lines.append(line)
        if m.kind == "lora" and m.opts["r"] == 8:
            for rank in CONVERSION_RANKS:
                conv = [
                    r for r in log.rows
                    if r["method"] == conversion_name(rank) and _same(r["lr"], lr) and r["seed"] in args.seeds
                ]  # fmt: skip
                if conv:
                    c = Line(conversion_name(rank), conv[0]["family"], conv[0]["adapter_params"], lr)
                    c.by_seed = {r["seed"]: r["dev_accuracy"] for r in conv}
                    c.seconds = [r["train_seconds"] for r in conv]
                    lines.append(c)
    return lines


def write_summary(lines: list[Line], out: Path, args: argparse.Namespace, wall: float) -> str:
    with (out / "summary.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["method", "family", "adapter_params", "lr", "seeds", "mean_dev_accuracy", "std_dev_accuracy"])
        for ln in lines:
            writer.writerow([ln.method, ln.family, ln.params, ln.lr, len(ln.accs), f"{ln.mean:.5f}", f"{ln.std:.5f}"])
    main = [ln for ln in lines if not ln.ablation]
    ablations = [ln for ln in lines if ln.ablation]
    table = accuracy_table(main)
    if ablations:
        table += ["", "Ablations of LoTR rank 8 (a tensor per target):", "", *accuracy_table(ablations)]
    table += ["", "Against LoRA and default LoTR, by seed (mean paired difference ± 2 standard errors, points):", ""]
    table += comparison_table(lines)
    text = "\n".join(table)
    header = (
        f"{args.steps} steps x {args.batch} sentences, lr grid {', '.join(f'{lr:g}' for lr in args.lrs)} "
        f"(chosen on the tune half, seed {args.seeds[0]}), seeds {', '.join(map(str, args.seeds))}; "
        + ("a report of runs.csv\n\n" if args.report else f"this invocation ran {wall / 60:.1f} min\n\n")
    )
    (out / "summary.md").write_text(header + text + "\n")
    return header + text


def accuracy_table(lines: list[Line]) -> list[str]:
    table = [
        "| method | adapter params | lr | dev accuracy (mean ± sd) | seeds | train s / run |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for ln in lines:
        lr = f"{ln.lr:g}" + (" (edge)" if ln.edge else "")
        secs = f"{statistics.fmean(ln.seconds):.0f}" if ln.seconds else ""
        accuracy = f"{100 * ln.mean:.2f} ± {100 * ln.std:.2f}"
        table.append(f"| {ln.method} | {ln.params:,} | {lr} | {accuracy} | {len(ln.accs)} | {secs} |")
    return table


def paired_difference(a: Line, b: Line) -> tuple[float, float] | None:
    """Mean of ``a - b`` over the seeds both ran (same data sample and order) and 2 standard errors, in points."""
    seeds = sorted(set(a.by_seed) & set(b.by_seed))
    if len(seeds) < 2:
        return None
    diffs = [100 * (a.by_seed[s] - b.by_seed[s]) for s in seeds]
    return statistics.fmean(diffs), 2 * statistics.stdev(diffs) / math.sqrt(len(diffs))


def comparison_table(lines: list[Line]) -> list[str]:
    loras = [ln for ln in lines if ln.family == "LoRA" or ln.method == DEFAULT_LOTR]
    others = [ln for ln in lines if ln not in loras]
    if not loras or not others:
        return []
    table = [
        "| method | adapter params | " + " | ".join(f"vs {ln.method} ({ln.params:,})" for ln in loras) + " |",
        "|---|---:|" + "---:|" * len(loras),
    ]
    for ln in others:
        cells = []
        for lora in loras:
            diff = paired_difference(ln, lora)
            cells.append("" if diff is None else f"{diff[0]:+.2f} ± {diff[1]:.2f}")
        table.append(f"| {ln.method} | {ln.params:,} | " + " | ".join(cells) + " |")
    return table


def plot(lines: list[Line], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = [ln for ln in lines if not ln.ablation]
    markers = dict(zip(dict.fromkeys(ln.family for ln in lines), "osD^v<>phX*", strict=False))
    fig, ax = plt.subplots(figsize=(8.5, 5.2))
    for i, family in enumerate(markers):
        chosen = [ln for ln in lines if ln.family == family]
        dodge = 1 + 0.025 * (i - (len(markers) - 1) / 2)  # families at one size drawn side by side
        x = [ln.params * dodge for ln in chosen]
        y, err = [100 * ln.mean for ln in chosen], [100 * ln.std for ln in chosen]
        ax.errorbar(x, y, yerr=err, fmt=markers[family], capsize=3, label=family, alpha=0.85)
    ax.set_xscale("log")
    ax.set_xlabel("adapter parameters (log scale, families nudged apart; classifier head not counted)")
    ax.set_ylabel("SST-2 dev accuracy, held-out half (%)")
    ax.set_title("all-MiniLM-L6-v2 on SST-2: mean ± sd over seeds, each at its tuned learning rate")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


# --- command line ---------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data", type=Path, default=Path("../shared/data/sst2"), help="folder with train.tsv and dev.tsv"
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results/sst2"), help="folder for the CSVs and the plot")
    parser.add_argument("--model", type=Path, default=None, help="model folder (default: the packaged MiniLM)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument(
        "--lrs", type=lambda s: [float(x) for x in s.split(",")], default=[1e-3, 2e-3, 3e-3, 5e-3, 1e-2, 2e-2]
    )
    parser.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2, 3])
    parser.add_argument(
        "--extend", type=int, default=2, help="times a grid may grow by 2.5x where its best rate is its largest"
    )
    parser.add_argument("--dev-limit", type=int, default=None, help="evaluate on this many dev rows (both halves)")
    parser.add_argument("--methods", type=lambda s: s.split(","), default=None, help="comma-separated method names")
    parser.add_argument("--no-ablations", action="store_true", help="leave out the LoTR ablations")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="runs in parallel")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument(
        "--quick", action="store_true", help="smoke version: 30 steps, 400 dev rows, one seed and rate, no extension"
    )
    parser.add_argument("--list", action="store_true", help="list the methods and exit")
    parser.add_argument("--report", action="store_true", help="no runs: summarise and plot what runs.csv holds")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.seeds, args.lrs, args.extend = min(args.steps, 30), args.seeds[:1], [3e-3], 0
        args.dev_limit = args.dev_limit or 400
    if args.steps < 1 or args.batch < 1 or args.extend < 0 or not args.lrs or not args.seeds:
        parser.error("--steps and --batch must be positive, --extend not negative; --lrs and --seeds non-empty")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    every = methods()
    if args.list:
        for m in every:
            print(f"{m.name:34s} {m.family:30s} {m.config}")
        return 0
    if args.methods is not None:
        known = {m.name for m in every}
        unknown = [n for n in args.methods if n not in known]
        if unknown:
            print(f"unknown methods {unknown}; --list shows them", file=sys.stderr)
            return 2
        chosen = [m for m in every if m.name in args.methods]
    else:
        chosen = [m for m in every if not (args.no_ablations and m.ablation)]
    args.out.mkdir(parents=True, exist_ok=True)
    settings = Settings(args.data, args.steps, args.batch, args.dev_limit, args.model, args.threads)
    load_data(args.data, args.dev_limit)  # fail early on a bad folder
    log = RunLog(args.out / "runs.csv")
    start = time.perf_counter()
    if args.report:
        grids = method_grids(chosen, args, log)
        chosen_lr = {m.name: best_lr(log, m, grids[m.name], args.seeds[0]) for m in chosen}
        chosen = [m for m in chosen if chosen_lr[m.name] is not None and log.done(m, chosen_lr[m.name], args.seeds[0])]
    else:
        chosen_lr, grids = study(chosen, args, settings, log)
    wall = time.perf_counter() - start
    lines = summarise(chosen, chosen_lr, grids, log, args)
    if not lines:
        print(f"{args.out / 'runs.csv'} holds no finished method", file=sys.stderr)
        return 1
    print(write_summary(lines, args.out, args, wall))
    plot(lines, args.out / "accuracy_vs_params.png")
    print(f"\nwrote {args.out / 'runs.csv'}, summary.csv, summary.md and accuracy_vs_params.png in {wall / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
