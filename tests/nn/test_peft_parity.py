"""LoTRModel (nn/model.py) where a PEFT user reaches for PEFT's API: issue 22's list, each point against PEFT."""

from __future__ import annotations

import dataclasses
import re

import peft
import pytest
import torch
from builders import inputs, logits, randomise_cores, tiny_bert, tiny_llama, tiny_t5, token_ids

import tensorlotr as tlr
from tensorlotr.nn import LoTRLayer

#: PEFT's refusal of a mixed batch while an adapter is merged (peft/tuners/lora/layer.py).
PEFT_MERGED = "Cannot pass `adapter_names` when there are merged adapters, please call `unmerge_adapter` first."


def two_adapters() -> tlr.LoTRModel:
    """A tiny Llama with adapters ``default`` (q_proj, v_proj) and ``other`` (q_proj), both non-zero; eval mode."""
    lotr = tlr.get_lotr_model(tiny_llama(), tlr.LoTRConfig(rank=4, target_modules=["q_proj", "v_proj"]))
    lotr.add_adapter("other", tlr.LoTRConfig(rank=2, target_modules=["q_proj"]))
    torch.manual_seed(3)
    with torch.no_grad():
        for _, layer in lotr.lotr_layers():
            for core in layer.lotr_cores.values():
                core.normal_()
    return lotr.eval()


def test_a_mixed_batch_is_refused_while_an_adapter_is_merged_as_in_peft():
    lotr = two_adapters()
    x = token_ids(batch=2)
    expected = {name: logits(lotr, {"input_ids": x}, adapter_names=[name, name]) for name in ("__base__", "other")}
    lotr.merge_adapter()
    for names in (["__base__", "__base__"], ["other", "other"], ["__base__", "other"], ["default", "default"]):
        with pytest.raises(ValueError, match=re.escape(PEFT_MERGED)):
            lotr(input_ids=x, adapter_names=names)
        with pytest.raises(ValueError, match="please call `unmerge_adapter` first"):
            lotr.generate(input_ids=x, adapter_names=names, max_new_tokens=2, do_sample=False)
    lotr.unmerge_adapter()
    for name, value in expected.items():  # unmerged, the mixed batches serve again
        torch.testing.assert_close(logits(lotr, {"input_ids": x}, adapter_names=[name, name]), value)

    lora = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    lora.eval().merge_adapter()
    with pytest.raises(ValueError, match="please call `unmerge_adapter` first"):  # what PEFT says, for comparison
        lora(input_ids=x, adapter_names=["__base__", "__base__"])


def test_merging_an_unknown_adapter_is_refused_by_name_with_no_weight_changed():
    lotr = two_adapters()
    before = {n: p.detach().clone() for n, p in lotr.base_model.named_parameters() if "lotr" not in n}
    for call in (lambda: lotr.merge_adapter(["nope"]), lambda: lotr.merge_adapter(["other", "nope"])):
        with pytest.raises(ValueError, match=r"unknown adapters \['nope'\]; adapters: \['default', 'other'\]"):
            call()
    with pytest.raises(ValueError, match=r"unknown adapters \['nope'\]"):
        lotr.merge_and_unload(adapter_names=["nope"])
    assert not any(layer.merged for _, layer in lotr.lotr_layers())
    for name, value in lotr.base_model.named_parameters():
        if name in before:
            assert torch.equal(value, before[name]), name


def test_inference_mode_leaves_nothing_trainable():
    config = tlr.LoTRConfig(rank=4, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    trained = tlr.get_lotr_model(tiny_llama(), config)
    assert trained.get_nb_trainable_parameters()[0] > 0
    frozen = tlr.get_lotr_model(tiny_llama(), dataclasses.replace(config, inference_mode=True))
    assert frozen.get_nb_trainable_parameters()[0] == 0
    assert not any(p.requires_grad for p in frozen.parameters())


def test_peft_keywords_on_merge_and_load(tmp_path):
    lotr = two_adapters()
    expected = logits(lotr, inputs())
    lotr.save_pretrained(tmp_path)
    loaded = tlr.LoTRModel.from_pretrained(tiny_llama(), tmp_path, torch_device="cpu", is_trainable=True)
    assert (
        loaded.get_nb_trainable_parameters()
        == tlr.LoTRModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True).get_nb_trainable_parameters()
    )
    torch.testing.assert_close(logits(loaded.eval(), inputs()), expected, rtol=0, atol=0)
    merged = lotr.merge_and_unload(safe_merge=True, adapter_names=["default"], progressbar=True)
    assert not any(isinstance(m, LoTRLayer) for m in merged.modules())
    torch.testing.assert_close(logits(merged, inputs()), expected, atol=1e-5, rtol=1e-5)


def test_peft_s_switches_status_and_state_dicts():
    lotr = two_adapters()
    assert lotr.peft_config is lotr.lotr_configs and sorted(lotr.peft_config) == ["default", "other"]
    base = logits(lotr, inputs(), adapter_names=["__base__"] * 2)
    adapted = logits(lotr, inputs())
    lotr.disable_adapter_layers()
    torch.testing.assert_close(logits(lotr, inputs()), base, rtol=0, atol=0)
    assert lotr.get_model_status().enabled is False
    lotr.enable_adapter_layers()
    torch.testing.assert_close(logits(lotr, inputs()), adapted, rtol=0, atol=0)
    status = lotr.get_model_status()
    assert status.enabled is True and status.available_adapters == ["default", "other"]
    assert status.active_adapters == ["default"] and status.requires_grad == {"default": True, "other": False}
    layers = lotr.get_layer_status()
    assert len(layers) == 6 and {layer.name.rsplit(".", 1)[-1] for layer in layers} == {"q_proj", "v_proj"}
    lotr.set_requires_grad("other", requires_grad=True)
    assert lotr.get_model_status().requires_grad == {"default": True, "other": True}
    lotr.set_requires_grad(["default", "other"], requires_grad=False)
    assert lotr.get_nb_trainable_parameters()[0] == 0
    with pytest.raises(ValueError, match="nope"):
        lotr.set_requires_grad("nope")
    state = lotr.get_adapter_state_dict("default")
    assert state and all(".default" not in key and "lotr" in key for key in state)


def test_add_weighted_adapter_is_exact():
    lotr = tlr.get_lotr_model(tiny_llama(), tlr.LoTRConfig(rank=4, target_modules=["q_proj"]))
    lotr.add_adapter("b", tlr.LoTRConfig(rank=4, target_modules=["q_proj"]))
    randomise_cores(lotr, seed=1)
    lotr.add_weighted_adapter(["default", "b"], [0.5, 0.5], "mix", combination_type="cat")
    _, layer = next(iter(lotr.lotr_layers()))
    expected = 0.5 * layer.delta_weight(adapter="default") + 0.5 * layer.delta_weight(adapter="b")
    torch.testing.assert_close(layer.delta_weight(adapter="mix"), expected, atol=1e-5, rtol=1e-5)


def test_hotswap_replaces_the_tensors_in_place(tmp_path):
    source = two_adapters()
    expected = logits(source, inputs())
    source.save_pretrained(tmp_path)
    target = tlr.get_lotr_model(tiny_llama(), tlr.LoTRConfig(rank=4, target_modules=["q_proj", "v_proj"])).eval()
    core = next(iter(target.lotr_layers()))[1].lotr_cores["default"]
    target.hotswap_adapter(tmp_path, torch_device="cpu")
    assert next(iter(target.lotr_layers()))[1].lotr_cores["default"] is core
    torch.testing.assert_close(logits(target, inputs()), expected, atol=1e-6, rtol=1e-5)


# --- layers that show their base layer: T5 reads self.wo.weight ---------------------------------------


@pytest.mark.parametrize("targets", ["all-linear", ["wo"]])
def test_t5_forward_reads_the_base_weight_through_the_adapted_layer(targets):
    lotr = tlr.get_lotr_model(tiny_t5(), tlr.LoTRConfig(rank=4, target_modules=targets))
    wo = lotr.base_model.encoder.block[0].layer[1].DenseReluDense.wo
    assert isinstance(wo, LoTRLayer) and wo.weight is wo.base_layer.weight
    assert "lm_head" not in {name.rsplit(".", 1)[-1] for name, _ in lotr.lotr_layers()}
    randomise_cores(lotr)
    x, y = token_ids(), token_ids(length=3, seed=2)
    out = lotr(input_ids=x, decoder_input_ids=y).logits
    assert out.shape == (2, 3, 64) and torch.isfinite(out).all()
    lotr.train()
    lotr(input_ids=x, labels=y).loss.backward()
    assert all(p.grad is not None for p in lotr.lotr_factors.parameters())


# --- all-linear leaves the output head to modules_to_save, as PEFT ---------------------------------------


def test_all_linear_with_modules_to_save_trains_a_full_copy_of_the_head():
    config = tlr.LoTRConfig(rank=4, target_modules="all-linear", modules_to_save=["classifier"])  # no task_type
    lotr = tlr.get_lotr_model(tiny_bert(), config)  # rank 4 > num_labels 2: no rank error
    assert "classifier" not in [name for name, _ in lotr.lotr_layers()]
    original = tiny_bert().classifier
    head = lotr.base_model.classifier  # the trained copy sits in place; the original waits in the wrapper
    (wrapper,) = lotr.modules_to_save_wrappers
    assert wrapper.original_module is not head and not any(
        p.requires_grad for p in wrapper.original_module.parameters()
    )
    trainable = {n for n, p in lotr.named_parameters() if p.requires_grad}
    assert {n for n in trainable if "classifier" in n} == {"base_model.classifier.weight", "base_model.classifier.bias"}
    lotr.train()
    optimizer = torch.optim.SGD([p for p in lotr.parameters() if p.requires_grad], lr=0.5)
    lotr(**inputs(), labels=torch.tensor([0, 1])).loss.backward()
    optimizer.step()
    assert not torch.equal(head.weight, original.weight)  # the full head trained
    torch.testing.assert_close(wrapper.original_module.weight, original.weight, rtol=0, atol=0)
    lora_config = peft.LoraConfig(r=4, target_modules="all-linear", modules_to_save=["classifier"])
    lora = peft.get_peft_model(tiny_bert(), lora_config)
    lora_adapted = {n.removeprefix("base_model.model.") for n, m in lora.named_modules() if hasattr(m, "lora_A")}
    assert sorted(lora_adapted) == sorted(name for name, _ in lotr.lotr_layers())
