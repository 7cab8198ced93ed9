"""LoTRLayer (nn/layer.py): merging (Conv1D too), mixed precision (autocast, low-precision bases), torch.compile.

Inductor compiles for tens of seconds on a 2-core machine, so one test uses it, on a one-layer Llama.
"""

from __future__ import annotations

import copy

import pytest
import torch
from builders import assert_same, inputs, loss_and_grads, randomise_cores, tiny_bert, tiny_gpt2, tiny_llama
from torch import nn

import tensorlotr as tlr


def test_conv1d_merge_orientation():
    model = tiny_gpt2()
    lotr = tlr.get_lotr_model(model, tlr.LoTRConfig(rank=4, target_modules=["c_attn"]))
    randomise_cores(lotr, scale=0.3)
    _, layer = next(lotr.lotr_layers())
    x = torch.randn(5, 32)
    with torch.no_grad():
        expected = layer(x)
        layer.merge()
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=0)
        assert isinstance(layer.base_layer, nn.Module) and layer.fan_in_fan_out


# --- mixed precision -------------------------------------------------------------------------


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


# --- torch.compile(fullgraph=True) ---------------------------------------------------------------


@pytest.mark.usefixtures("fresh_dynamo")
def test_inductor_fullgraph_matches_eager_forward_and_backward():
    groups = {"q": ["q_proj"], "kv": ["k_proj", "v_proj"]}  # k and v share x V: the cache is bypassed
    lotr = tlr.get_lotr_model(tiny_llama(0, num_hidden_layers=1), tlr.LoTRConfig(rank=4, groups=groups))
    randomise_cores(lotr)
    lotr.train()
    batch = inputs()
    eager = loss_and_grads(lotr, lotr, **batch)
    compiled = loss_and_grads(torch.compile(lotr, fullgraph=True), lotr, **batch)
    assert len(compiled[1]) == 2 * 2 + 3  # U and V of two groups, one core per adapted layer
    assert_same(compiled, eager)
