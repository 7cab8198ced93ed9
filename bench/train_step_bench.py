"""Training-step and inference time of LoTR against PEFT LoRA and the frozen base.

    HF_HUB_OFFLINE=1 python bench/train_step_bench.py [--steps 10] [--rank 8] [--rounds 3] [--threads 1] [--no-compile]

The packaged all-MiniLM-L6-v2 as a 2-label classifier, batches of 32 x 64 tokens. A step is
forward + backward + AdamW on the trainable parameters (adapters and the classifier head;
the base run trains only the head), in three modes: eager float32; compiled
(``torch.compile(model, fullgraph=True)``, Inductor, the optimizer step eager); and eager
under ``torch.autocast("cpu", dtype=torch.bfloat16)``. Dropout is off, so a compiled model
computes what its eager self does: before its first step each compiled model's loss and
trainable gradients are compared with the eager ones on the same batch and parameters. Every
(model, mode) has its own model and optimizer; runs are interleaved and the median is
reported. Inference is a no-grad forward of the merged LoTR model against the base. Times are
CPU time of the process (``time.process_time``) with ``--threads`` torch threads, since on a
shared machine wall time also counts other jobs; the first compiled step is wall time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import machine

import tensorlotr as tlr
from tensorlotr.demo import default_model_dir, load_classifier

MODES = ("eager", "compiled", "bf16 autocast")


def make_model(kind: str, rank: int) -> torch.nn.Module:
    """A fresh MiniLM classifier, dropout off: the base with only its head trainable, LoTR, or PEFT LoRA."""
    _, model = load_classifier(default_model_dir(), seed=0)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    if kind == "base (frozen)":
        for p in model.parameters():
            p.requires_grad_(False)
        model.classifier.requires_grad_(True)
        return model
    if kind == "LoTR":
        config = tlr.LoTRConfig(
            rank=rank, alpha=2 * rank, target_modules=["query", "value"], modules_to_save=["classifier"]
        )
        return tlr.get_lotr_model(model, config)
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["query", "value"], modules_to_save=["classifier"])
    return get_peft_model(model, config)


def step_fn(model: torch.nn.Module, mode: str, batch: dict, labels: torch.Tensor) -> tuple[Callable[[], None], Any]:
    """One training step of ``model`` in ``mode``, and the forward it calls (the compiled model when compiled)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    model.train()
    forward = torch.compile(model, fullgraph=True) if mode == "compiled" else model

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "bf16 autocast"):
            loss = forward(**batch, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step, forward


def compiled_matches_eager(
    model: torch.nn.Module, compiled: Callable, batch: dict, labels: torch.Tensor
) -> tuple[float, float]:
    """|loss difference| and max |gradient difference| of ``compiled`` against ``model``; compiles it."""
    results = []
    for forward in (model, compiled):
        model.zero_grad()
        loss = forward(**batch, labels=labels).loss
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])
        results.append((loss.detach(), grads))
    model.zero_grad()
    (eager_loss, eager_grads), (loss, grads) = results
    return float((loss - eager_loss).abs()), float((grads - eager_grads).abs().max())


def timed(fn: Callable[[], object], steps: int) -> list[float]:
    """CPU seconds of each of ``steps`` calls of ``fn``."""
    times = []
    for _ in range(steps):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled runs (minutes of compiling)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    batch = {"input_ids": torch.randint(1000, 20000, (32, 64)), "attention_mask": torch.ones(32, 64, dtype=torch.long)}
    labels = torch.randint(0, 2, (32,))
    kinds = ("base (frozen)", "LoTR", "PEFT LoRA")
    modes = [m for m in MODES if not (args.no_compile and m == "compiled")]
    runs = {(k, m): make_model(k, args.rank) for m in modes for k in kinds if not (m == "compiled" and k == kinds[0])}
    steps, forwards = {}, {}
    for key, model in runs.items():
        steps[key], forwards[key] = step_fn(model, key[1], batch, labels)
    first_step: dict[tuple[str, str], float] = {}
    checks: dict[str, tuple[float, float]] = {}
    for key, fn in steps.items():
        if key[1] == "compiled":
            start = time.perf_counter()
            checks[key[0]] = compiled_matches_eager(runs[key], forwards[key], batch, labels)
            first_step[key] = time.perf_counter() - start  # mostly compiling
            timed(fn, 1)
        else:
            start = time.perf_counter()
            fn()
            first_step[key] = time.perf_counter() - start
        timed(fn, 1)  # warm-up
    train_times: dict[tuple[str, str], list[float]] = {key: [] for key in runs}
    for _ in range(args.rounds):
        for key, fn in steps.items():
            train_times[key] += timed(fn, args.steps)

    lotr, base = runs[("LoTR", "eager")], runs[("base (frozen)", "eager")]
    lotr.eval()
    base.eval()
    lotr.merge_adapter()

    def infer(model):
        def run():
            with torch.no_grad():
                model(**batch)

        return run

    infer_times: dict[str, list[float]] = {"base": [], "LoTR merged": [], "LoTR unmerged": []}
    for _ in range(args.rounds):
        infer_times["base"] += timed(infer(base), args.steps)
        infer_times["LoTR merged"] += timed(infer(lotr), args.steps)
        lotr.unmerge_adapter()
        infer_times["LoTR unmerged"] += timed(infer(lotr), args.steps)
        lotr.merge_adapter()

    def med(times: list[float]) -> float:
        return statistics.median(times) * 1e3

    print(f"Machine: {machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"MiniLM-L6 (384 hidden, 6 layers), batch 32 x 64 tokens, rank {args.rank}, targets query+value\n")
    print("| training step | mode | trainable params | CPU ms per step (median) ", end="")
    print("| ratio to PEFT LoRA (same mode) | first step (s) |")
    print("|---|---|---|---|---|---|")
    for mode in modes:
        lora_ms = med(train_times[("PEFT LoRA", mode)])
        for kind in kinds:
            if (kind, mode) not in runs:
                continue
            model = runs[(kind, mode)]
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            ms = med(train_times[(kind, mode)])
            print(
                f"| {kind} | {mode} | {trainable:,} | {ms:.1f} | {ms / lora_ms:.3f} | {first_step[(kind, mode)]:.1f} |"
            )
    for kind, (loss_diff, grad_diff) in checks.items():
        print(f"\n{kind} compiled vs eager, same batch: |loss difference| {loss_diff:.1e}, max |grad difference| "
              f"{grad_diff:.1e}", end="")  # fmt: skip
    print("\n\n| inference (no grad) | CPU ms per batch (median) | ratio to base |")
    print("|---|---|---|")
    base_ms = med(infer_times["base"])
    for name, times in infer_times.items():
        print(f"| {name} | {med(times):.1f} | {med(times) / base_ms:.3f} |")


if __name__ == "__main__":
    main()
