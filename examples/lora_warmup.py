"""Train LoTR after a short LoRA warm-up, the recipe that won the SST-2 study.

    HF_HUB_OFFLINE=1 .venv/bin/python examples/lora_warmup.py --data ../shared/data/sst2 --out sst2-lotr

A PEFT LoRA r=8 on ``query`` and ``value`` of the packaged MiniLM trains for the first fifth
of the steps; ``LoTRModel.from_peft_model`` converts it in memory to LoTR rank 8 (the
classifier head comes along), and LoTR trains for the rest on the same linear schedule.
Without ``--data`` it trains on the built-in sentiment task. It ends with the accuracy
before and after the conversion and at the end, and saves the LoTR adapter.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import peft
import torch

import tensorlotr as tlr
from tensorlotr.jobs.data import builtin_sentiment, read_tsv
from tensorlotr.jobs.demo import default_model_dir, evaluate, load_classifier


def batches(tokenizer, rows: list[tuple[str, int]], steps: int, batch: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(steps):
        chunk = rng.sample(rows, min(batch, len(rows)))
        enc = tokenizer([s for s, _ in chunk], padding=True, truncation=True, max_length=64, return_tensors="pt")
        out.append({**enc, "labels": torch.tensor([y for _, y in chunk])})
    return out


def train(model, data: list[dict], steps: range, total: int, lr: float) -> None:
    """AdamW on ``model``'s trainable parameters over ``steps`` of a linear schedule of ``total`` steps, 10% warm-up."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    warm = max(1, total // 10)
    model.train()
    for step in steps:
        factor = (step + 1) / warm if step < warm else max(0.0, (total - step) / max(1, total - warm))
        for group in optimizer.param_groups:
            group["lr"] = lr * factor
        model(**data[step]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="folder with train.tsv and dev.tsv (default: built-in task)")
    parser.add_argument("--out", type=Path, default=Path("lotr-after-lora-warmup"), help="where to save the adapter")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--warmup-fraction", type=float, default=0.2, help="share of the steps trained as LoRA")
    args = parser.parse_args()

    if args.data is None:
        train_rows, dev_rows = builtin_sentiment(seed=0)
    else:
        train_rows, dev_rows = read_tsv(args.data / "train.tsv"), read_tsv(args.data / "dev.tsv", limit=1000)
    tokenizer, model = load_classifier(default_model_dir())
    data = batches(tokenizer, train_rows, args.steps, args.batch, seed=0)
    warm = max(1, int(args.warmup_fraction * args.steps))

    lora = peft.get_peft_model(
        model, peft.LoraConfig(r=args.rank, target_modules=["query", "value"], modules_to_save=["classifier"])
    )
    train(lora, data, range(warm), args.steps, args.lr)
    lora_accuracy = evaluate(lora, tokenizer, dev_rows)

    lotr = tlr.LoTRModel.from_peft_model(lora, rank=args.rank)
    converted_accuracy = evaluate(lotr, tokenizer, dev_rows)
    errors = ", ".join(f"{g} {e:.3f}" for g, e in lotr.conversion_errors.items())
    lotr.print_trainable_parameters()
    train(lotr, data, range(warm, args.steps), args.steps, args.lr)
    final_accuracy = evaluate(lotr, tokenizer, dev_rows)
    lotr.save_pretrained(args.out)

    print(f"LoRA after {warm} steps: accuracy {lora_accuracy:.3f}")
    print(f"converted to LoTR rank {args.rank} (relative error: {errors}): accuracy {converted_accuracy:.3f}")
    print(f"LoTR after {args.steps - warm} more steps: accuracy {final_accuracy:.3f}; adapter saved in {args.out}")


if __name__ == "__main__":
    main()
