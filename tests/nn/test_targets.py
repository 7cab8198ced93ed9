"""Target modules (nn/targets.py): PEFT's selection rules, what cannot be adapted, and quantized bitsandbytes layers.

QLoTR: LoTR on bitsandbytes bases, 4-bit nf4 / fp4 and 8-bit layers, on CPU. The base is a small
Llama saved from a config and loaded back through transformers with a ``BitsAndBytesConfig``, as
users load quantized models. Its width is 64, the 4-bit block size: bitsandbytes' CPU kernels need
whole blocks.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from builders import inputs, tiny_bert, tiny_llama
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

import tensorlotr as tlr
from tensorlotr.nn.targets import dense_weight, quantization

try:
    import bitsandbytes as bnb
except ImportError:
    bnb = None
needs_bnb = pytest.mark.skipif(bnb is None, reason="bitsandbytes is not installed (pip install 'tensorlotr[quant]')")


# --- target selection, as PEFT selects --------------------------------------------------------


def _targets(model, **kwargs):
    return [name for name, _ in tlr.get_lotr_model(model, tlr.LoTRConfig(rank=2, **kwargs)).lotr_layers()]


def _peft_targets(model, **kwargs):
    peft_model = get_peft_model(model, LoraConfig(r=2, **kwargs))
    return sorted(n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if hasattr(m, "lora_A"))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"target_modules": "all-linear"},
        {"target_modules": "all-linear", "exclude_modules": ["o_proj", "down_proj"]},
        {"target_modules": ["q_proj", "v_proj"], "layers_to_transform": [1], "layers_pattern": "layers"},
        {"target_modules": ["q_proj", "k_proj"], "exclude_modules": r".*\.0\.self_attn\.k_proj"},
    ],
)
def test_target_selection_matches_peft(kwargs):
    assert sorted(_targets(tiny_llama(0), **kwargs)) == _peft_targets(tiny_llama(0), **kwargs)


def test_all_linear_leaves_out_the_head_of_a_classifier():
    chosen = _targets(tiny_bert(0), target_modules="all-linear", task_type="SEQ_CLS")
    assert chosen and "classifier" not in chosen and all(not n.startswith("classifier") for n in chosen)
    assert chosen == sorted(chosen, key=chosen.index)  # model order
    assert "classifier" in _targets(tiny_bert(0), target_modules="all-linear")  # PEFT keeps it without SEQ_CLS


def test_layers_to_transform_and_regex_targets():
    model = tiny_llama()
    lotr = tlr.get_lotr_model(model, tlr.LoTRConfig(rank=2, target_modules=["q_proj"], layers_to_transform=[0, 2]))
    assert lotr.groups["q_proj"].modules == ["model.layers.0.self_attn.q_proj", "model.layers.2.self_attn.q_proj"]
    lotr = tlr.get_lotr_model(tiny_llama(), tlr.LoTRConfig(rank=2, target_modules=r".*\.(q|k)_proj"))
    assert set(lotr.groups) == {"q_proj", "k_proj"}


def test_targets_that_match_nothing_list_close_names():
    with pytest.raises(ValueError, match=r"match no nn.Linear.*close names: \['query'\]"):
        tlr.get_lotr_model(tiny_bert(), tlr.LoTRConfig(target_modules=["querry"]))


def test_unsupported_layer_types():
    with pytest.raises(ValueError, match=r"word_embeddings' is a Embedding; LoTR adapts nn.Linear"):
        tlr.get_lotr_model(tiny_bert(), tlr.LoTRConfig(target_modules=["word_embeddings"]))
    with pytest.raises(ValueError, match="LayerNorm"):
        tlr.get_lotr_model(tiny_bert(), tlr.LoTRConfig(target_modules=r".*attention\.output\.LayerNorm"))


# --- quantized bases (QLoTR) ---------------------------------------------------------------------


KINDS = ["nf4", "fp4", "int8"]


TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module")
def saved_base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    base = tiny_llama(0, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_key_value_heads=4)
    base.save_pretrained(folder)
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


@needs_bnb
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


@needs_bnb
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


@needs_bnb
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


@needs_bnb
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


@needs_bnb
def test_svd_init_decomposes_the_dequantized_weights(saved_base):
    lotr = tlr.get_lotr_model(load(saved_base, "nf4"), tlr.LoTRConfig(rank=4, target_modules=["q_proj"], init="svd"))
    stack = torch.stack([dense_weight(layer.base_layer).double() for _, layer in lotr.lotr_layers()])
    expected = tlr.tucker2(stack, 4).out_factor
    got = lotr.lotr_factors["q_proj"].out_factor.detach().double()
    torch.testing.assert_close(got.abs(), expected.abs(), atol=1e-5, rtol=0)
