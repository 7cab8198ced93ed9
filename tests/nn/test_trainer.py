"""transformers.Trainer evaluation: eval_loss, label names, best checkpoints, resuming."""

from __future__ import annotations

import inspect
import logging

import torch
from models import VOCAB, tiny_bert
from transformers import BertConfig, BertForQuestionAnswering, Trainer, TrainingArguments

import tensorlotr as tlr


class LabelledDataset(torch.utils.data.Dataset):
    """Token rows with a class label; ``flip`` swaps the labels, so training on one set worsens the other."""

    def __init__(self, n: int = 8, flip: bool = False) -> None:
        generator = torch.Generator().manual_seed(0)
        self.ids = torch.randint(2, VOCAB, (n, 8), generator=generator)
        self.flip = flip

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.ids[i]
        label = (int(ids[0]) + int(self.flip)) % 2
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor(label)}


def args(tmp_path, **kwargs) -> TrainingArguments:
    defaults = dict(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, per_device_eval_batch_size=8,
        learning_rate=5e-2, save_strategy="steps", save_steps=1, eval_strategy="steps", eval_steps=1,
        report_to=[], use_cpu=True, dataloader_num_workers=0, disable_tqdm=True, seed=0,
    )  # fmt: skip
    defaults.update(kwargs)
    return TrainingArguments(**defaults)


def make_lotr() -> tlr.LoTRModel:
    config = tlr.LoTRConfig(rank=4, target_modules=["query", "value"], modules_to_save=["classifier"])
    return tlr.get_lotr_model(tiny_bert(), config)


def adapter_state(lotr: tlr.LoTRModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in lotr.adapter_files().tensors.items()}


def test_signatures_name_labels_and_base_inputs():
    lotr = make_lotr()
    assert "labels" in inspect.signature(type(lotr).forward).parameters  # what Trainer's find_labels reads
    assert "input_ids" in inspect.signature(lotr.forward).parameters  # what remove_unused_columns reads
    batch = LabelledDataset()[0]
    with torch.no_grad():
        out = lotr(**{k: v[None] for k, v in batch.items()})
    assert out.loss is not None and out.loss.ndim == 0


def test_plain_trainer_evaluate_reports_eval_loss(tmp_path):
    trainer = Trainer(model=make_lotr(), args=args(tmp_path, eval_strategy="no"), eval_dataset=LabelledDataset())
    assert trainer.label_names == ["labels"]
    metrics = trainer.evaluate()
    assert metrics["eval_loss"] > 0


def test_lotr_trainer_reloads_the_best_adapter(tmp_path):
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logging.getLogger("transformers.trainer").addHandler(handler)
    lotr = make_lotr()
    trainer = tlr.LoTRTrainer(
        model=lotr,
        args=args(tmp_path, metric_for_best_model="loss", load_best_model_at_end=True),
        train_dataset=LabelledDataset(),
        eval_dataset=LabelledDataset(flip=True),  # the eval loss rises as training fits the other labels
    )
    try:
        trainer.train()
    finally:
        logging.getLogger("transformers.trainer").removeHandler(handler)
    assert not [r for r in records if "Could not locate the best model" in r.getMessage()]
    losses = [entry["eval_loss"] for entry in trainer.state.log_history if "eval_loss" in entry]
    assert len(losses) == 3 and losses[0] < losses[1] < losses[2]
    assert trainer.state.best_model_checkpoint == str(tmp_path / "checkpoint-1")
    best = tlr.LoTRModel.from_pretrained(tiny_bert(), tmp_path / "checkpoint-1")
    last = tlr.LoTRModel.from_pretrained(tiny_bert(), tmp_path / "checkpoint-3")
    got, want, final = adapter_state(lotr), adapter_state(best), adapter_state(last)
    assert got.keys() == want.keys() and "modules_to_save.classifier.weight" in got
    for key in got:
        torch.testing.assert_close(got[key], want[key], atol=0, rtol=0)
    assert any(not torch.equal(got[key], final[key]) for key in got)
    assert trainer.evaluate()["eval_loss"] == losses[0]


def test_lotr_trainer_takes_label_names_from_the_base_model(tmp_path):
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=32
    )
    lotr = tlr.get_lotr_model(BertForQuestionAnswering(config), tlr.LoTRConfig(rank=2, target_modules=["query"]))
    trainer = tlr.LoTRTrainer(model=lotr, args=args(tmp_path, eval_strategy="no"))
    assert trainer.label_names == ["start_positions", "end_positions"]
    given = tlr.LoTRTrainer(model=lotr, args=args(tmp_path, eval_strategy="no", label_names=["start_positions"]))
    assert given.label_names == ["start_positions"]
