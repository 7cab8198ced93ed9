"""Train a LoTR adapter on SST-2 with the packaged MiniLM and transformers.Trainer.

    HF_HUB_OFFLINE=1 .venv/bin/python examples/train_sst2.py --data ../shared/data/sst2 --out sst2-lotr

The data folder holds GLUE's ``train.tsv`` and ``dev.tsv`` (``sentence<TAB>label``). The
adapter is saved at checkpoints by ``LoTRTrainer``; the script ends with dev accuracy, and
the adapter reloaded onto a fresh base model.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import tensorlotr as tlr
from tensorlotr.jobs.data import read_tsv
from tensorlotr.jobs.demo import default_model_dir, evaluate, load_classifier


class Sentences(torch.utils.data.Dataset):
    def __init__(self, rows: list[tuple[str, int]], tokenizer, max_length: int = 64) -> None:
        self.encoded = tokenizer([s for s, _ in rows], truncation=True, max_length=max_length)
        self.labels = [y for _, y in rows]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.encoded["input_ids"][i], "labels": self.labels[i]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="folder with train.tsv and dev.tsv")
    parser.add_argument("--out", type=Path, default=Path("sst2-lotr"))
    parser.add_argument("--train-rows", type=int, default=4000)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rank", type=int, default=8)
    args = parser.parse_args()

    from transformers import DataCollatorWithPadding, TrainingArguments

    tokenizer, model = load_classifier(default_model_dir())
    config = tlr.LoTRConfig(rank=args.rank, target_modules=["query", "value"], modules_to_save=["classifier"])
    lotr = tlr.get_lotr_model(model, config)
    lotr.print_trainable_parameters()
    train = read_tsv(args.data / "train.tsv", limit=args.train_rows)
    dev = read_tsv(args.data / "dev.tsv", limit=1000)
    trainer = tlr.LoTRTrainer(
        model=lotr,
        args=TrainingArguments(
            output_dir=str(args.out),
            max_steps=args.steps,
            per_device_train_batch_size=32,
            learning_rate=5e-3,
            save_steps=max(1, args.steps // 2),
            logging_steps=20,
            report_to=[],
            use_cpu=True,
        ),
        train_dataset=Sentences(train, tokenizer),
        data_collator=DataCollatorWithPadding(tokenizer),
    )
    trainer.train()
    lotr.save_pretrained(args.out / "final")
    print(f"dev accuracy: {evaluate(lotr, tokenizer, dev):.3f}")
    _, fresh = load_classifier(default_model_dir(), seed=1)
    reloaded = tlr.LoTRModel.from_pretrained(fresh, args.out / "final")
    print(f"dev accuracy after reloading onto a fresh base: {evaluate(reloaded, tokenizer, dev):.3f}")


if __name__ == "__main__":
    main()
