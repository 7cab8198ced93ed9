"""Training-step and inference time of LoTR against PEFT LoRA and the frozen base.

    HF_HUB_OFFLINE=1 python bench/train_step_bench.py [--steps 10] [--rank 8]

The packaged all-MiniLM-L6-v2 as a 2-label classifier, batches of 32 x 64 tokens. A step is
forward + backward + AdamW on the trainable parameters (adapters and the classifier head;
the base run trains only the head). Inference is a no-grad forward of the merged LoTR model
against the base. Runs are interleaved and the median is reported.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import machine

import tensorlotr as tlr
from tensorlotr.demo import default_model_dir, load_classifier


def make_models(rank: int):
    from peft import LoraConfig, get_peft_model

    _, base = load_classifier(default_model_dir(), seed=0)
    for p in base.parameters():
        p.requires_grad_(False)
    base.classifier.requires_grad_(True)
    _, model = load_classifier(default_model_dir(), seed=0)
    lotr = tlr.get_lotr_model(
        model,
        tlr.LoTRConfig(rank=rank, alpha=2 * rank, target_modules=["query", "value"], modules_to_save=["classifier"]),
    )
    _, model = load_classifier(default_model_dir(), seed=0)
    lora = get_peft_model(
        model,
        LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["query", "value"], modules_to_save=["classifier"]),
    )
    return {"base (frozen)": base, "LoTR": lotr, "PEFT LoRA": lora}


def step_fn(model, batch, labels):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()

    def step():
        loss = model(**batch, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step


def timed(fn, steps: int) -> list[float]:
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    batch = {"input_ids": torch.randint(1000, 20000, (32, 64)), "attention_mask": torch.ones(32, 64, dtype=torch.long)}
    labels = torch.randint(0, 2, (32,))
    models = make_models(args.rank)
    steps = {name: step_fn(m, batch, labels) for name, m in models.items()}
    for fn in steps.values():
        timed(fn, 2)  # warm-up
    train_times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.rounds):
        for name, fn in steps.items():
            train_times[name] += timed(fn, args.steps)

    lotr, base = models["LoTR"], models["base (frozen)"]
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
    print("| training step | trainable params | ms per step (median) | ratio to PEFT LoRA |")
    print("|---|---|---|---|")
    lora_ms = med(train_times["PEFT LoRA"])
    for name, model in models.items():
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        ms = med(train_times[name])
        print(f"| {name} | {trainable:,} | {ms:.1f} | {ms / lora_ms:.3f} |")
    print("\n| inference (no grad) | ms per batch (median) | ratio to base |")
    print("|---|---|---|")
    base_ms = med(infer_times["base"])
    for name, times in infer_times.items():
        print(f"| {name} | {med(times):.1f} | {med(times) / base_ms:.3f} |")


if __name__ == "__main__":
    main()
