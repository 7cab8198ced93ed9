"""Mixed precision: torch.autocast, low-precision bases, the adapter's own dtype, Trainer(bf16=True)."""

from __future__ import annotations

import copy

import pytest
import torch
from models import VOCAB, inputs, tiny_bert, tiny_llama

import tensorlotr as tlr
from tensorlotr.nn.layer import Step

LOW = [torch.bfloat16, torch.float16]


def trained(model: torch.nn.Module, steps: int = 5, **config) -> tlr.LoTRModel:
    """LoTR on q_proj and v_proj of ``model``, trained a few steps in float32."""
    lotr = tlr.get_lotr_model(model, tlr.LoTRConfig(rank=4, alpha=8, target_modules=["q_proj", "v_proj"], **config))
    optimizer = torch.optim.Adam([p for p in lotr.parameters() if p.requires_grad], lr=1e-2)
    lotr.train()
    for step in range(steps):
        batch = inputs(seed=step)
        loss = lotr(**batch, labels=batch["input_ids"]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return lotr.eval()


def bf16_close(actual: torch.Tensor, expected: torch.Tensor, ulps: float = 2.0) -> None:
    """Equal up to ``ulps`` bfloat16 roundings at the scale of ``expected``."""
    tolerance = ulps * 2.0**-8 * float(expected.abs().max())
    torch.testing.assert_close(actual.float(), expected.float(), rtol=0, atol=tolerance)


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("groups", ["by_name", "shared"])
def test_autocast_runs_the_adapter_in_low_precision(dtype, groups):
    lotr = tlr.get_lotr_model(
        tiny_bert(), tlr.LoTRConfig(rank=4, target_modules=["query", "value"], groups=groups, init="normal")
    )
    with torch.no_grad():
        for _, layer in lotr.lotr_layers():
            layer.lotr_core.normal_()
        reference = lotr(**inputs()).logits
        with torch.autocast("cpu", dtype=dtype):
            logits = lotr(**inputs()).logits
            layer = next(layer for _, layer in lotr.lotr_layers())
            update = layer.adapter_output(torch.randn(2, 5, 32))
    assert update.dtype == dtype  # the adapter's products ran in the autocast dtype
    assert lotr.lotr_factors[next(iter(lotr.groups))].in_factor.dtype == torch.float32  # weights stay float32
    assert not torch.equal(logits.float(), reference)
    bf16_close(logits, reference, ulps=4)


def test_autocast_backward_gives_float32_gradients():
    lotr = trained(tiny_llama(), steps=1)
    lotr.train()
    batch = inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = lotr(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    factors = lotr.lotr_factors["q_proj"]
    assert factors.in_factor.grad.dtype == torch.float32 and factors.in_factor.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", LOW)
def test_low_precision_base_without_autocast(dtype):
    model = tiny_llama()
    batch = inputs()
    reference = trained(copy.deepcopy(model))
    lotr = tlr.LoTRModel.from_adapter_files(model.to(dtype), reference.adapter_files())
    assert lotr.lotr_factors["q_proj"].out_factor.dtype == torch.float32  # PEFT's default: float32 adapters
    with torch.no_grad():
        logits = lotr(**batch).logits
        assert logits.dtype == dtype  # the update is cast to the base layer's output dtype
        bf16_close(logits, reference(**batch).logits, ulps=4)
        lotr.to(dtype)  # the whole model cast after attaching: the adapter follows
        assert lotr.lotr_factors["q_proj"].out_factor.dtype == dtype
        assert lotr(**batch).logits.dtype == dtype


def test_adapter_dtype_option(tmp_path):
    config = tlr.LoTRConfig(rank=4, target_modules=["q_proj", "v_proj"], adapter_dtype="bfloat16")
    assert tlr.LoTRConfig.from_dict(config.to_dict()) == config
    lotr = tlr.get_lotr_model(tiny_llama(), config)
    assert {p.dtype for n, p in lotr.named_parameters() if "lotr_" in n} == {torch.bfloat16}
    for _, layer in lotr.lotr_layers():
        with torch.no_grad():
            layer.lotr_core.normal_()
    batch = inputs()
    with torch.no_grad():
        logits = lotr(**batch).logits
    assert logits.dtype == torch.float32  # a float32 base keeps its output dtype
    lotr.save_pretrained(tmp_path)
    loaded = tlr.LoTRModel.from_pretrained(tiny_llama(), tmp_path)
    assert loaded.lotr_factors["q_proj"].in_factor.dtype == torch.bfloat16
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match="adapter_dtype must be one of"):
        tlr.LoTRConfig(adapter_dtype="int8")


def test_merging_a_bf16_adapter_keeps_a_float32_base_exact():
    model = tiny_llama()
    original = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    lotr = tlr.get_lotr_model(
        model, tlr.LoTRConfig(rank=4, target_modules=["q_proj"], adapter_dtype="bfloat16", init="normal")
    )
    for _, layer in lotr.lotr_layers():
        with torch.no_grad():
            layer.lotr_core.normal_()
    lotr.merge_adapter()
    layer = lotr.base_model.model.layers[0].self_attn.q_proj
    expected = original + layer.delta_weight(torch.float32)
    torch.testing.assert_close(layer.base_layer.weight, expected, rtol=0, atol=1e-6)
    lotr.unmerge_adapter()
    torch.testing.assert_close(layer.base_layer.weight, original, rtol=0, atol=1e-6)  # not rounded to bf16


@pytest.mark.parametrize("dtype", LOW)
def test_exported_lora_in_peft_matches_under_autocast(dtype, tmp_path):
    peft = pytest.importorskip("peft")
    base = tiny_llama()
    lotr = trained(copy.deepcopy(base))
    tlr.export_lora(lotr, tmp_path / "lora")
    lora = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "lora").eval()
    batch = inputs(seed=9)
    with torch.no_grad():
        plain = base(**batch).logits
        with torch.autocast("cpu", dtype=dtype):
            ours, theirs = lotr(**batch).logits, lora(**batch).logits
    assert ours.dtype == theirs.dtype == dtype
    bf16_close(ours, theirs)
    assert (ours.float() - plain).abs().max() > 20 * 2.0**-8 * float(theirs.abs().max())  # the adapter matters


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
