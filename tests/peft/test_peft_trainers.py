"""TRL's SFT and DPO trainers and transformers' Trainer drive LoTR as they drive LoRA: train, save, resume, reload."""

from __future__ import annotations

import contextlib

import pytest
import torch
from builders import (
    needs_seq2seq_peft,
    sentences,
    skip_unless_lotr_peft,
    tiny_gpt2,
    tiny_llama,
    tiny_t5,
    token_ids,
    word_tokenizer,
)
from datasets import Dataset
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

skip_unless_lotr_peft()

import tensorlotr as tlr  # noqa: E402
from tensorlotr import LoTRModel  # noqa: E402
from tensorlotr.peft import LoTRPeftConfig  # noqa: E402

trl = pytest.importorskip("trl", reason="trl is not installed (pip install 'tensorlotr[dev]')")

#: What an adapter-only checkpoint holds besides the trainer's state; never the model's weights.
ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors"}
MODEL_FILES = {"model.safetensors", "pytorch_model.bin", "model.safetensors.index.json"}


def config(**kwargs) -> LoTRPeftConfig:
    return LoTRPeftConfig(**{"rank": 4, "alpha": 8, "target_modules": "all-linear", "task_type": "CAUSAL_LM", **kwargs})


def sft_args(output_dir, **kwargs):
    values = {
        "output_dir": str(output_dir), "max_steps": 4, "per_device_train_batch_size": 4, "learning_rate": 5e-3,
        "save_strategy": "steps", "save_steps": 2, "logging_steps": 1, "report_to": [], "use_cpu": True,
        "max_length": 16, "seed": 0, "data_seed": 0, "disable_tqdm": True, "bf16": False, **kwargs,
    }  # fmt: skip
    return trl.SFTConfig(**values)


def logits(model):
    model.eval()
    with torch.no_grad():
        return model(input_ids=token_ids()).logits


def adapter_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lotr_" in n}


def test_sft_with_a_lotr_peft_config_trains_checkpoints_adapter_only_resumes_and_reloads(tmp_path):
    data = Dataset.from_dict({"text": sentences(32)})
    trainer = trl.SFTTrainer(
        model=tiny_llama(), args=sft_args(tmp_path / "run"), train_dataset=data, processing_class=word_tokenizer(),
        peft_config=config(),
    )  # fmt: skip
    assert isinstance(trainer.model, PeftModel) and trainer.model.peft_config["default"].peft_type == "LOTR"
    before = adapter_state(trainer.model)
    trainer.train()
    after = adapter_state(trainer.model)
    assert all(not torch.equal(before[n], after[n]) for n in before if "lotr_factors" in n)  # the factors train too
    assert any(not torch.equal(before[n], after[n]) for n in before if "lotr_cores" in n)
    for step in (2, 4):
        files = {p.name for p in (tmp_path / "run" / f"checkpoint-{step}").iterdir()}
        assert files >= ADAPTER_FILES and not files & MODEL_FILES, files

    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "run" / "checkpoint-4")
    torch.testing.assert_close(logits(reloaded), logits(trainer.model), rtol=0, atol=0)
    as_lotr = LoTRModel.from_pretrained(tiny_llama(), tmp_path / "run" / "checkpoint-4")  # one folder format
    torch.testing.assert_close(logits(as_lotr), logits(trainer.model), rtol=0, atol=0)

    resumed = trl.SFTTrainer(
        model=tiny_llama(), args=sft_args(tmp_path / "resumed"), train_dataset=data, processing_class=word_tokenizer(),
        peft_config=config(),
    )  # fmt: skip
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    assert resumed.state.global_step == 4
    for name, value in adapter_state(resumed.model).items():  # two steps from the checkpoint: the same run
        torch.testing.assert_close(value, after[name], atol=1e-6, rtol=1e-5)


def test_sft_takes_a_lotr_peft_model_too(tmp_path):
    model = get_peft_model(tiny_llama(), config())
    before = adapter_state(model)
    args = sft_args(tmp_path / "run", max_steps=2, bf16=None)  # TRL's default: bf16 autocast where it can
    trainer = trl.SFTTrainer(
        model=model,
        args=args,
        processing_class=word_tokenizer(),
        train_dataset=Dataset.from_dict({"text": sentences(16)}),
    )
    trainer.train()
    assert any(not torch.equal(before[n], v) for n, v in adapter_state(model).items())
    trainer.save_model(str(tmp_path / "final"))
    files = {p.name for p in (tmp_path / "final").iterdir()}
    assert files >= ADAPTER_FILES and not files & MODEL_FILES


def lotr_model() -> LoTRModel:
    return tlr.get_lotr_model(tiny_llama(), config().to_lotr_config())


def checkpoint_files(folder) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in folder.iterdir()}


def test_sft_takes_a_lotr_model_checkpoints_its_adapter_only_resumes_and_reloads(tmp_path):
    data = Dataset.from_dict({"text": sentences(32)})
    model = lotr_model()
    before = adapter_state(model)
    trainer = trl.SFTTrainer(
        model=model, args=sft_args(tmp_path / "run"), train_dataset=data, processing_class=word_tokenizer()
    )
    assert trainer.model is model
    trainer.train()  # TRL's fused LM head goes to the base model: no AttributeError about last_hidden_state
    after = adapter_state(model)
    assert all(not torch.equal(before[n], after[n]) for n in before if "lotr_factors" in n)
    for step in (2, 4):  # Trainer saves the state_dict of a model that is no PreTrainedModel: the adapter's tensors
        folder = tmp_path / "run" / f"checkpoint-{step}"
        files = checkpoint_files(folder)
        assert "model.safetensors" in files and files["model.safetensors"] < 20_000, files  # the base: 518 KB
        saved = load_file(folder / "model.safetensors")
        assert saved.keys() == model.state_dict().keys() and all("lotr_" in k for k in saved), sorted(saved)

    resumed_model = lotr_model()
    resumed = trl.SFTTrainer(
        model=resumed_model, args=sft_args(tmp_path / "resumed"), train_dataset=data, processing_class=word_tokenizer()
    )
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    assert resumed.state.global_step == 4
    for name, value in adapter_state(resumed_model).items():
        torch.testing.assert_close(value, after[name], atol=1e-6, rtol=1e-5)

    model.save_pretrained(tmp_path / "final")  # the adapter folder, for both loaders
    expected = logits(model)
    torch.testing.assert_close(
        logits(LoTRModel.from_pretrained(tiny_llama(), tmp_path / "final")), expected, rtol=0, atol=0
    )
    torch.testing.assert_close(
        logits(PeftModel.from_pretrained(tiny_llama(), tmp_path / "final")), expected, rtol=0, atol=0
    )


def test_dpo_trains_a_lotr_model_against_its_disabled_adapter(tmp_path):
    model = lotr_model()
    base_logits = logits(tiny_llama())
    data = Dataset.from_dict(
        {"prompt": sentences(8, seed=1), "chosen": sentences(8, seed=2), "rejected": sentences(8, seed=3)}
    )
    args = trl.DPOConfig(
        output_dir=str(tmp_path / "dpo"), max_steps=2, per_device_train_batch_size=4, learning_rate=5e-3,
        report_to=[], use_cpu=True, max_length=24, logging_steps=1, save_strategy="no", disable_tqdm=True, bf16=False,
    )  # fmt: skip
    reference = model.reference_model()
    trainer = trl.DPOTrainer(
        model=model, ref_model=reference, args=args, train_dataset=data, processing_class=word_tokenizer()
    )
    assert trainer.ref_model is reference  # no second copy of the base model
    calls = []
    reference.register_forward_pre_hook(lambda module, args: calls.append(True))
    before = adapter_state(model)
    trainer.train()
    assert calls, "the reference log-probs were not computed by the reference model"
    assert any(not torch.equal(before[n], v) for n, v in adapter_state(model).items())
    torch.testing.assert_close(logits(reference), base_logits, rtol=0, atol=0)  # the reference is the base model


def test_dpo_uses_the_disabled_adapter_as_reference(tmp_path):
    base = tiny_llama()
    base_logits = logits(base)
    prompts = sentences(8, seed=1)
    data = Dataset.from_dict(
        {"prompt": prompts, "chosen": sentences(8, seed=2), "rejected": sentences(8, seed=3)}
    )  # fmt: skip
    args = trl.DPOConfig(
        output_dir=str(tmp_path / "dpo"), max_steps=2, per_device_train_batch_size=4, learning_rate=5e-3,
        report_to=[], use_cpu=True, max_length=24, logging_steps=1, save_strategy="no", disable_tqdm=True, bf16=False,
    )  # fmt: skip
    trainer = trl.DPOTrainer(
        model=base,
        ref_model=None,
        args=args,
        train_dataset=data,
        processing_class=word_tokenizer(),
        peft_config=config(),
    )
    assert trainer.ref_model is None
    disabled = []
    original = trainer.model.disable_adapter

    @contextlib.contextmanager
    def spy():
        disabled.append(True)
        with original():
            yield

    trainer.model.disable_adapter = spy
    before = adapter_state(trainer.model)
    trainer.train()
    assert disabled, "the reference log-probs were not computed with the adapter disabled"
    assert any(not torch.equal(before[n], v) for n, v in adapter_state(trainer.model).items())
    with original():  # the reference is the base model
        torch.testing.assert_close(logits(trainer.model), base_logits, rtol=0, atol=0)


def _lm_dataset(tok, n=16):
    encoded = tok(sentences(n), padding="max_length", max_length=10, truncation=True)
    return Dataset.from_dict(dict(encoded))


def test_plain_trainer_saves_adapter_only_on_a_tied_embedding_model(tmp_path):
    gpt2 = tiny_gpt2()
    assert gpt2.lm_head.weight is gpt2.transformer.wte.weight
    model = get_peft_model(gpt2, config(target_modules=["c_attn", "c_proj"]))
    tok = word_tokenizer()
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=2, save_steps=1, per_device_train_batch_size=4, report_to=[],
        use_cpu=True, disable_tqdm=True, learning_rate=5e-3,
    )  # fmt: skip
    trainer = Trainer(
        model=model, args=args, train_dataset=_lm_dataset(tok),
        data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
    )  # fmt: skip
    trainer.train()
    files = {p.name for p in (tmp_path / "run" / "checkpoint-2").iterdir()}
    assert files >= ADAPTER_FILES and not files & MODEL_FILES, files
    reloaded = PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "run" / "checkpoint-2")
    torch.testing.assert_close(logits(reloaded), logits(model), rtol=0, atol=0)


@needs_seq2seq_peft
def test_t5_all_linear_trains_and_reloads(tmp_path):
    model = get_peft_model(tiny_t5(), config(target_modules="all-linear", task_type="SEQ_2_SEQ_LM"))
    assert type(model).__name__ == "PeftModelForSeq2SeqLM"
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(2):
        loss = model(input_ids=token_ids(), labels=token_ids(length=4, seed=2)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(tiny_t5(), tmp_path).eval()
    model.eval()
    with torch.no_grad():
        x, y = token_ids(), token_ids(length=4, seed=2)
        expected = model(input_ids=x, decoder_input_ids=y).logits
        torch.testing.assert_close(reloaded(input_ids=x, decoder_input_ids=y).logits, expected, rtol=0, atol=0)
