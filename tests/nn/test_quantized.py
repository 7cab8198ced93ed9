"""LoTR on bitsandbytes bases (QLoTR): 4-bit nf4 / fp4 and 8-bit layers, on CPU.

The base is a small Llama saved from a config and loaded back through transformers with a
``BitsAndBytesConfig``, as users load quantized models. Its width is 64, the 4-bit block size:
bitsandbytes' CPU kernels need whole blocks.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from models import inputs
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

import tensorlotr as tlr
from tensorlotr.nn.targets import dense_weight, quantization

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install 'tensorlotr[quant]')")

KINDS = ["nf4", "fp4", "int8"]
TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module")
def saved_base(tmp_path_factory):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=32, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )  # fmt: skip
    folder = tmp_path_factory.mktemp("llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def load(folder, kind: str | None) -> torch.nn.Module:
    if kind is None:
        return AutoModelForCausalLM.from_pretrained(folder)
    if kind == "int8":
        quant = BitsAndBytesConfig(load_in_8bit=True)
    else:
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=kind, bnb_4bit_compute_dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # int8 matmul notes that inputs are cast to fp16
        return AutoModelForCausalLM.from_pretrained(folder, quantization_config=quant, device_map="cpu")


def adapt(model: torch.nn.Module, **config) -> tlr.LoTRModel:
    torch.manual_seed(5)
    lotr = tlr.get_lotr_model(model, tlr.LoTRConfig(rank=4, alpha=8, target_modules=TARGETS, init="normal", **config))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in lotr.lotr_layers():
            layer.lotr_core.copy_(torch.randn(layer.lotr_core.shape, generator=generator) * 0.05)
    return lotr


def lm_loss(lotr: tlr.LoTRModel) -> torch.Tensor:
    batch = inputs(batch=2, length=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lotr(**batch, labels=batch["input_ids"]).loss


def gradients(lotr: tlr.LoTRModel) -> torch.Tensor:
    lotr.train()
    lotr.zero_grad()
    lm_loss(lotr).backward()
    return torch.cat([p.grad.flatten() for p in lotr.parameters() if p.requires_grad])


def logits(lotr: tlr.LoTRModel) -> torch.Tensor:
    lotr.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lotr(**inputs(seed=7)).logits


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("kind", KINDS)
def test_attaches_with_the_true_shapes_and_trains(saved_base, kind):
    model = load(saved_base, kind)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert quantization(q_proj) == ("8bit" if kind == "int8" else "4bit")
    lotr = adapt(model)
    assert lotr.groups["q_proj"].shape == (64, 64) and lotr.groups["down_proj"].shape == (64, 128)
    factors = lotr.lotr_factors["down_proj"]
    assert factors.out_factor.shape == (64, 4) and factors.in_factor.shape == (128, 4)
    assert factors.in_factor.dtype == torch.float32
    grads = gradients(lotr)
    assert torch.isfinite(grads).all() and grads.abs().sum() > 0
    assert all(p.grad is None for n, p in lotr.named_parameters() if "lotr_" not in n)  # the base stays frozen


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_agree_with_the_float_base_up_to_quantization_error(saved_base, kind):
    reference = adapt(load(saved_base, None))
    quantized = adapt(load(saved_base, kind))
    weight_error = max(
        relative(dense_weight(layer.base_layer).float(), reference.get_submodule(name).base_layer.weight)
        for name, layer in quantized.lotr_layers()
    )
    expected = gradients(reference)
    error = relative(gradients(quantized), expected)
    assert error < 3 * weight_error, (error, weight_error)
    other = adapt(load(saved_base, None))  # another base: how far gradients move when the weights do
    with torch.no_grad():
        for param in other.base_model.parameters():
            param.add_(torch.randn_like(param) * param.std() * 3 * weight_error)
    assert error < relative(gradients(other), expected)


@pytest.mark.parametrize("kind", KINDS)
def test_save_and_load_round_trip(saved_base, kind, tmp_path):
    lotr = adapt(load(saved_base, kind))
    expected = logits(lotr)
    lotr.save_pretrained(tmp_path)
    loaded = tlr.LoTRModel.from_pretrained(load(saved_base, kind), tmp_path)
    torch.testing.assert_close(logits(loaded), expected, rtol=0, atol=0)


def requantized(dense: torch.Tensor, weight: torch.nn.Parameter) -> torch.Tensor:
    """``dense`` quantized the way ``weight`` was, and dequantized: what a merge must store."""
    if type(weight).__name__ == "Int8Params":
        rows, scales, _ = bnb.functional.int8_vectorwise_quant(dense.half())
        return bnb.functional.int8_vectorwise_dequant(rows, scales)
    packed, state = bnb.functional.quantize_4bit(
        dense, blocksize=weight.blocksize, compress_statistics=weight.compress_statistics, quant_type=weight.quant_type
    )
    return bnb.functional.dequantize_4bit(packed, state)


@pytest.mark.parametrize("kind", KINDS)
def test_merge_dequantizes_adds_and_requantizes(saved_base, kind):
    lotr = adapt(load(saved_base, kind))
    unmerged = logits(lotr)
    with lotr.disable_adapter():
        without = logits(lotr)
    layer = lotr.base_model.model.layers[0].self_attn.q_proj
    original = dense_weight(layer.base_layer).float().clone()
    delta = layer.delta_weight(torch.float32).detach()
    expected = requantized(original + delta, layer.base_layer.weight).float()
    with pytest.warns(UserWarning, match="quantizes the sum again"):
        lotr.merge_adapter()
    assert type(layer.base_layer.weight).__name__ == ("Int8Params" if kind == "int8" else "Params4bit")
    merged_weight = dense_weight(layer.base_layer).float()
    torch.testing.assert_close(merged_weight, expected, rtol=0, atol=1e-6)
    merged = logits(lotr)
    # the update survives the rounding: the merged model is far closer to the adapter than to the base
    assert float((merged - unmerged).abs().max()) < 0.6 * float((without - unmerged).abs().max())
    with pytest.warns(UserWarning, match="quantizes the sum again"):
        lotr.unmerge_adapter()
    restored = dense_weight(layer.base_layer).float()
    # two more roundings: back near the original, not onto it
    assert relative(restored, original) < 2 * relative(merged_weight, original + delta)


def test_svd_init_decomposes_the_dequantized_weights(saved_base):
    lotr = tlr.get_lotr_model(load(saved_base, "nf4"), tlr.LoTRConfig(rank=4, target_modules=["q_proj"], init="svd"))
    stack = torch.stack([dense_weight(layer.base_layer).double() for _, layer in lotr.lotr_layers()])
    expected = tlr.tucker2(stack, 4).out_factor
    got = lotr.lotr_factors["q_proj"].out_factor.detach().double()
    torch.testing.assert_close(got.abs(), expected.abs(), atol=1e-5, rtol=0)
