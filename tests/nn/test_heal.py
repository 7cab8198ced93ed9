"""Healing a compressed adapter (nn/heal.py): distilling the original LoRA's outputs into its cores."""

from __future__ import annotations

import pytest
import torch
from builders import tiny_bert, token_batches

from tensorlotr.io import read_adapter
from tensorlotr.io.peft_lora import PeftLoRA
from tensorlotr.nn import LoTRModel
from tensorlotr.nn.heal import LoRATeacher, heal, heal_adapter, outputs_of


def _teacher(folder) -> LoRATeacher:
    lora = PeftLoRA(folder / "peft")
    names = list(lora.modules)
    bs, as_, scales = lora.load(names)
    return LoRATeacher(dict(zip(names, zip(bs, as_, scales, strict=True), strict=True)), lora.load_modules_to_save())


def test_teacher_hooks_reproduce_the_peft_model_and_leave_the_base_as_it_was(bert_lora):
    folder, peft_model = bert_lora
    base, batches = tiny_bert(0), token_batches(2, 50, length=10)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    expected = [peft_model(**b, output_hidden_states=True).hidden_states[-1].detach().reshape(-1, 32) for b in batches]
    for got, want in zip(_teacher(folder).outputs(base, batches), expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())


@pytest.mark.parametrize("train_factors", [False, True])
def test_heal_lowers_the_output_error_on_held_out_inputs(bert_lora, train_factors):
    folder, peft_model = bert_lora
    train, held = token_batches(12, 0, length=10), token_batches(4, 100, length=10)
    student = LoTRModel.from_adapter_files(tiny_bert(0), read_adapter(folder / "lotr"), is_trainable=True)
    base_out = outputs_of(tiny_bert(0), held)
    with torch.no_grad():
        teacher_out = [peft_model(**b, output_hidden_states=True).hidden_states[-1].reshape(-1, 32) for b in held]

    def held_out_error() -> float:
        student_out = outputs_of(student, held)
        err = sum(float((s - t).square().sum()) for s, t in zip(student_out, teacher_out, strict=True))
        ref = sum(float((t - b).square().sum()) for t, b in zip(teacher_out, base_out, strict=True))
        return (err / ref) ** 0.5

    before = held_out_error()
    report = heal(
        student, train + held, teacher=peft_model, steps=60, lr=1e-2, train_factors=train_factors, held_out=0.25
    )
    after = held_out_error()
    assert report.held_out_batches == 4 and report.train_batches == 12
    assert report.error_before == pytest.approx(before, rel=1e-4) and report.error_after == pytest.approx(
        after, rel=1e-4
    )
    assert after < before - 0.05, (before, after)
    assert report.loss_last < report.loss_first


def test_heal_adapter_trains_only_the_cores_and_restores_the_base(bert_lora):
    folder, _ = bert_lora
    base, files = tiny_bert(0), read_adapter(folder / "lotr")
    state = {k: v.clone() for k, v in base.state_dict().items()}
    healed, report = heal_adapter(base, files, _teacher(folder), token_batches(8, 0, length=10), steps=30, lr=1e-2)
    assert report.error_after < report.error_before
    for key, tensor in files.tensors.items():
        changed = not torch.equal(healed.tensors[key], tensor)
        assert changed == key.startswith("cores."), key
    assert all(torch.equal(state[k], v) for k, v in base.state_dict().items())
    assert all(p.requires_grad for p in base.parameters())
    assert type(base.bert.encoder.layer[0].attention.self.query) is torch.nn.Linear
