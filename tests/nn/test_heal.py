"""Healing a compressed adapter: distilling the original LoRA's outputs into its cores."""

from __future__ import annotations

import pytest
import torch
from models import inputs, tiny_bert
from peft import LoraConfig, get_peft_model

from tensorlotr.calibration import Calibration
from tensorlotr.convert import convert_lora
from tensorlotr.heal import LoRATeacher, heal, heal_adapter, outputs_of
from tensorlotr.io import read_adapter
from tensorlotr.io.peft_lora import PeftLoRA
from tensorlotr.nn import LoTRModel


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    """A PEFT LoRA with random factors and a trained head, its PEFT model, and its LoTR conversion at rank 2."""
    folder = tmp_path_factory.mktemp("heal")
    adapted = tiny_bert(0)
    torch.manual_seed(7)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["query", "value"], init_lora_weights=False,
        modules_to_save=["classifier"], task_type="SEQ_CLS",
    )  # fmt: skip
    peft_model = get_peft_model(adapted, config).eval()
    peft_model.save_pretrained(folder / "peft")
    convert_lora(folder / "peft", folder / "lotr", rank=2)
    return folder, peft_model


def _batches(n, seed):
    return [inputs(seed=seed + i, batch=4, length=10) for i in range(n)]


def _teacher(folder) -> LoRATeacher:
    lora = PeftLoRA(folder / "peft")
    names = list(lora.modules)
    bs, as_, scales = lora.load(names)
    return LoRATeacher(dict(zip(names, zip(bs, as_, scales, strict=True), strict=True)), lora.load_modules_to_save())


def test_teacher_hooks_reproduce_the_peft_model_and_leave_the_base_as_it_was(lora):
    folder, peft_model = lora
    base, batches = tiny_bert(0), _batches(2, 50)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    expected = [peft_model(**b, output_hidden_states=True).hidden_states[-1].detach().reshape(-1, 32) for b in batches]
    for got, want in zip(_teacher(folder).outputs(base, batches), expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())


@pytest.mark.parametrize("train_factors", [False, True])
def test_heal_lowers_the_output_error_on_held_out_inputs(lora, train_factors):
    folder, peft_model = lora
    train, held = _batches(12, 0), _batches(4, 100)
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


def test_heal_adapter_trains_only_the_cores_and_restores_the_base(lora):
    folder, _ = lora
    base, files = tiny_bert(0), read_adapter(folder / "lotr")
    state = {k: v.clone() for k, v in base.state_dict().items()}
    healed, report = heal_adapter(base, files, _teacher(folder), _batches(8, 0), steps=30, lr=1e-2)
    assert report.error_after < report.error_before
    for key, tensor in files.tensors.items():
        changed = not torch.equal(healed.tensors[key], tensor)
        assert changed == key.startswith("cores."), key
    assert all(torch.equal(state[k], v) for k, v in base.state_dict().items())
    assert all(p.requires_grad for p in base.parameters())
    assert type(base.bert.encoder.layer[0].attention.self.query) is torch.nn.Linear


def test_convert_with_heal_reports_errors_before_and_after(lora, tmp_path):
    folder, _ = lora
    calibration = Calibration(inputs=_batches(8, 0), base_model=tiny_bert(0), heal_steps=40, heal_lr=1e-2)
    report = convert_lora(folder / "peft", tmp_path / "out", rank=2, calibration=calibration)
    assert report.heal is not None and report.heal["error_after"] < report.heal["error_before"]
    for row in report.groups:
        assert None not in (row.output_error, row.healed_error, row.healed_output_error)
    assert "heal: 40 steps" in report.text()
    with pytest.raises(ValueError, match="needs the calibration inputs"):
        Calibration(stats=calibration.stats, heal_steps=5)
