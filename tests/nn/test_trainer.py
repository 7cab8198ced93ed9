"""transformers.Trainer and LoTRTrainer (nn/trainer.py): training, adapter checkpoints, evaluation, bf16."""

from __future__ import annotations

import inspect
import logging

import torch
from builders import VOCAB, TokenDataset, tiny_bert, tiny_gpt2, tiny_llama, training_args
from safetensors.torch import load_file
from transformers import BertForQuestionAnswering, Trainer, TrainingArguments

import tensorlotr as tlr
from tensorlotr.nn.planner import Step


def eval_args(tmp_path, **kwargs) -> TrainingArguments:
    """Three steps, each checkpointed and evaluated."""
    evaluation = dict(
        max_steps=3, per_device_eval_batch_size=8, learning_rate=5e-2, eval_strategy="steps", eval_steps=1
    )
    return training_args(tmp_path, **{**evaluation, **kwargs})


# --- training and adapter checkpoints ------------------------------------------------------------


def test_plain_trainer_runs_two_steps_and_saves(tmp_path):
    lotr = tlr.get_lotr_model(tiny_bert(), tlr.LoTRConfig(rank=4, target_modules=["query", "value"]))
    before = lotr.lotr_factors["query"].out_factor.detach().clone()
    trainer = Trainer(model=lotr, args=training_args(tmp_path), train_dataset=TokenDataset())
    result = trainer.train()
    assert result.global_step == 2
    assert not torch.equal(before, lotr.lotr_factors["query"].out_factor.detach())
    saved = load_file(str(tmp_path / "checkpoint-2" / "model.safetensors"))
    assert "lotr_factors.query.out_factor" in saved


def test_plain_trainer_on_a_tied_embedding_model_saves_the_adapter_only_and_resumes(tmp_path):
    # GPT-2's lm_head shares the embeddings' weight: saving the whole model raised "Some tensors share memory"
    def make():
        gpt2 = tiny_gpt2()
        assert gpt2.lm_head.weight is gpt2.transformer.wte.weight
        return tlr.get_lotr_model(gpt2, tlr.LoTRConfig(rank=4, target_modules=["c_attn", "c_proj"]))

    lotr = make()
    trainer = Trainer(
        model=lotr,
        args=training_args(tmp_path / "run", max_steps=4, save_steps=2),
        train_dataset=TokenDataset(labels="lm"),
    )
    trainer.train()
    base_bytes = sum(p.numel() * p.element_size() for p in tiny_gpt2().parameters())
    for step in (2, 4):
        folder = tmp_path / "run" / f"checkpoint-{step}"
        size = (folder / "model.safetensors").stat().st_size
        saved = load_file(str(folder / "model.safetensors"))
        assert saved.keys() == lotr.state_dict().keys() and all("lotr_" in key for key in saved), sorted(saved)
        assert size < base_bytes / 5, (size, base_bytes)  # the adapter, never a copy of the base
    resumed_model = make()
    resumed = Trainer(
        model=resumed_model,
        args=training_args(tmp_path / "resumed", max_steps=4, save_steps=2),
        train_dataset=TokenDataset(labels="lm"),
    )
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    assert resumed.state.global_step == 4
    for group in ("c_attn", "attn_c_proj", "mlp_c_proj"):
        torch.testing.assert_close(
            resumed_model.tucker(group).to_dense(), lotr.tucker(group).to_dense(), atol=1e-5, rtol=1e-4
        )
    assert resumed_model.base_model.lm_head.weight is resumed_model.base_model.transformer.wte.weight


def test_lotr_trainer_saves_adapter_checkpoints_and_resumes(tmp_path):
    def make():
        return tlr.get_lotr_model(tiny_gpt2(), tlr.LoTRConfig(rank=4, target_modules=["c_attn"]))

    full = tlr.LoTRTrainer(
        model=make(), args=training_args(tmp_path / "a", max_steps=4), train_dataset=TokenDataset(labels="lm")
    )
    full.train()
    checkpoint = tmp_path / "a" / "checkpoint-2"
    assert (checkpoint / "adapter_config.json").is_file() and (checkpoint / "adapter_model.safetensors").is_file()
    assert not (checkpoint / "model.safetensors").exists()  # the base model is not copied into checkpoints
    loaded = tlr.LoTRModel.from_pretrained(tiny_gpt2(), checkpoint)
    assert loaded.lotr_factors["c_attn"].out_factor.shape == (96, 4)

    resumed_model = make()
    resumed = tlr.LoTRTrainer(
        model=resumed_model, args=training_args(tmp_path / "a", max_steps=4), train_dataset=TokenDataset(labels="lm")
    )
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 4
    final = full.model.tucker("c_attn").to_dense()
    torch.testing.assert_close(resumed_model.tucker("c_attn").to_dense(), final, atol=1e-5, rtol=1e-4)


def test_trainer_bf16_trains_under_autocast(tmp_path, monkeypatch):
    from transformers import Trainer, TrainingArguments

    seen: list[tuple[bool, torch.dtype]] = []
    apply = Step.apply

    def recording(self, *operands, **kwargs):
        out = apply(self, *operands, **kwargs)
        seen.append((torch.is_autocast_enabled("cpu"), out.dtype))
        return out

    monkeypatch.setattr(Step, "apply", recording)  # every product of every adapter layer

    class Tokens(torch.utils.data.Dataset):
        def __init__(self) -> None:
            self.ids = torch.randint(2, VOCAB, (8, 8), generator=torch.Generator().manual_seed(0))

        def __len__(self) -> int:
            return len(self.ids)

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {"input_ids": self.ids[i], "labels": self.ids[i]}

    def train(bf16: bool) -> float:
        seen.clear()
        lotr = tlr.get_lotr_model(tiny_llama(), tlr.LoTRConfig(rank=4, target_modules=["q_proj", "v_proj"]))
        args = TrainingArguments(
            output_dir=str(tmp_path / str(bf16)), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
            report_to=[], use_cpu=True, bf16=bf16, save_strategy="no", disable_tqdm=True, seed=0,
        )  # fmt: skip
        result = Trainer(model=lotr, args=args, train_dataset=Tokens()).train()
        assert lotr.lotr_factors["q_proj"].in_factor.dtype == torch.float32
        return result.training_loss

    fp32_loss = train(False)
    assert seen and set(seen) == {(False, torch.float32)}
    bf16_loss = train(True)
    assert seen and set(seen) == {(True, torch.bfloat16)}  # every adapter product ran under autocast
    assert bf16_loss != fp32_loss
    assert abs(bf16_loss - fp32_loss) < 0.05 * fp32_loss


# --- evaluation: eval_loss, label names, best checkpoints --------------------------------------------


def make_lotr() -> tlr.LoTRModel:
    config = tlr.LoTRConfig(rank=4, target_modules=["query", "value"], modules_to_save=["classifier"])
    return tlr.get_lotr_model(tiny_bert(), config)


def adapter_state(lotr: tlr.LoTRModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in lotr.adapter_files().tensors.items()}


def test_signatures_name_labels_and_base_inputs():
    lotr = make_lotr()
    assert "labels" in inspect.signature(type(lotr).forward).parameters  # what Trainer's find_labels reads
    assert "input_ids" in inspect.signature(lotr.forward).parameters  # what remove_unused_columns reads
    batch = TokenDataset(n=8)[0]
    with torch.no_grad():
        out = lotr(**{k: v[None] for k, v in batch.items()})
    assert out.loss is not None and out.loss.ndim == 0


def test_plain_trainer_evaluate_reports_eval_loss(tmp_path):
    trainer = Trainer(model=make_lotr(), args=eval_args(tmp_path, eval_strategy="no"), eval_dataset=TokenDataset(n=8))
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
        args=eval_args(tmp_path, metric_for_best_model="loss", load_best_model_at_end=True),
        train_dataset=TokenDataset(n=8),
        eval_dataset=TokenDataset(n=8, flip=True),  # the eval loss rises as training fits the other labels
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
    model = tiny_bert(model_class=BertForQuestionAnswering, num_hidden_layers=1, intermediate_size=32)
    lotr = tlr.get_lotr_model(model, tlr.LoTRConfig(rank=2, target_modules=["query"]))
    trainer = tlr.LoTRTrainer(model=lotr, args=eval_args(tmp_path, eval_strategy="no"))
    assert trainer.label_names == ["start_positions", "end_positions"]
    given = tlr.LoTRTrainer(model=lotr, args=eval_args(tmp_path, eval_strategy="no", label_names=["start_positions"]))
    assert given.label_names == ["start_positions"]
