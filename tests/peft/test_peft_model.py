"""LoTR as a PEFT method: get_peft_model, saving and loading, adapters, merging, modules_to_save, as for LoRA."""

from __future__ import annotations

import copy
import json
import re
import warnings

import pytest
import torch
from builders import (
    needs_seq2seq_peft,
    randomise_peft_cores,
    skip_unless_lotr_peft,
    tiny_bert,
    tiny_gpt2,
    tiny_llama,
    tiny_t5,
    token_ids,
)
from peft import (
    AutoPeftModelForCausalLM,
    AutoPeftModelForSequenceClassification,
    LoraConfig,
    PeftModel,
    get_peft_model,
    get_peft_model_state_dict,
    set_peft_model_state_dict,
)
from peft.utils import ModulesToSaveWrapper
from safetensors.torch import load_file

skip_unless_lotr_peft()

from tensorlotr.peft import LoTRLinear, LoTRPeftConfig  # noqa: E402


def lotr(model, **kwargs):
    kwargs.setdefault("rank", 4)
    kwargs.setdefault("target_modules", ["q_proj", "v_proj"])
    return get_peft_model(model, LoTRPeftConfig(**kwargs))


def adapted(model) -> list[str]:
    return sorted(n.removeprefix("base_model.model.") for n, m in model.named_modules() if isinstance(m, LoTRLinear))


def logits(model, x=None):
    model.eval()  # no dropout
    with torch.no_grad():
        return model(input_ids=token_ids() if x is None else x).logits


# --- what is adapted and what trains ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"target_modules": "all-linear"},
        {"target_modules": "all-linear", "exclude_modules": ["o_proj", "down_proj"]},
        {"target_modules": ["q_proj", "v_proj"], "layers_to_transform": [1], "layers_pattern": "layers"},
        {"target_modules": r".*\.(q|k)_proj"},
        {"target_modules": "all-linear", "modules_to_save": ["down_proj"]},
    ],
)
def test_targets_are_the_modules_lora_adapts(kwargs):
    lora = get_peft_model(tiny_llama(), LoraConfig(r=2, **kwargs))
    lora_targets = sorted(n.removeprefix("base_model.model.") for n, m in lora.named_modules() if hasattr(m, "lora_A"))
    assert adapted(lotr(tiny_llama(), **kwargs)) == lora_targets


def test_factors_are_held_once_by_the_tuner_and_train_with_the_cores():
    model = lotr(tiny_llama(), task_type="CAUSAL_LM")
    assert type(model).__name__ == "PeftModelForCausalLM"
    trainable = {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}
    factors = {n: s for n, s in trainable.items() if n.startswith("base_model.lotr_factors.default.")}
    assert factors == {
        "base_model.lotr_factors.default.q_proj.out_factor": (32, 4),
        "base_model.lotr_factors.default.q_proj.in_factor": (32, 4),
        "base_model.lotr_factors.default.v_proj.out_factor": (16, 4),  # 2 key-value heads of 8
        "base_model.lotr_factors.default.v_proj.in_factor": (32, 4),
    }
    cores = [n for n in trainable if n.endswith("lotr_cores.default")]
    assert len(cores) == 6 and len(trainable) == 10  # 3 layers; nothing of the base trains
    assert model.get_nb_trainable_parameters()[0] == 32 * 4 * 3 + 16 * 4 + 6 * 16
    layer = model.base_model.model.model.layers[1].self_attn.q_proj
    assert layer.factors is model.base_model.lotr_factors["default"]["q_proj"]  # a reference, not a copy
    assert sum("lotr_factors" in k for k in model.state_dict()) == 4


def test_starts_at_the_base_and_adds_the_scaled_tucker2_update():
    base = tiny_llama()
    before = logits(base)
    model = lotr(copy.deepcopy(base), alpha=8, rank=(4, 2))
    assert torch.equal(logits(model), before)  # zero cores
    randomise_peft_cores(model)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    factors = layer.factors
    expected = 8 / 2 * factors.out_factor @ layer.lotr_cores["default"] @ factors.in_factor.T
    torch.testing.assert_close(layer.get_delta_weight("default"), expected)
    x = torch.randn(3, 32)
    torch.testing.assert_close(layer(x), layer.base_layer(x) + x @ expected.T, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(logits(model), before)


def test_default_targets_and_copies():
    model = lotr(tiny_llama(), target_modules=None)  # PEFT's default for Llama
    assert model.peft_config["default"].target_modules == ["q_proj", "v_proj"] and len(adapted(model)) == 6
    grouped = lotr(tiny_llama(), target_modules=None, groups={"attn": ["q_proj", "o_proj"]})  # the groups' modules
    assert list(grouped.base_model.lotr_groups["default"]) == ["attn"] and len(adapted(grouped)) == 6
    randomise_peft_cores(model)
    twin = copy.deepcopy(model)
    layer = twin.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.factors is twin.base_model.lotr_factors["default"]["q_proj"]  # the copy's own factors
    torch.testing.assert_close(logits(twin), logits(model), rtol=0, atol=0)


def test_inference_mode_leaves_nothing_trainable():
    model = lotr(tiny_llama(), inference_mode=True, modules_to_save=["lm_head"])
    assert model.get_nb_trainable_parameters()[0] == 0


@needs_seq2seq_peft
@pytest.mark.parametrize("targets", ["all-linear", ["wo"]])
def test_layers_show_the_base_layers_attributes(targets):
    model = lotr(tiny_t5(), target_modules=targets, task_type="SEQ_2_SEQ_LM")
    wo = model.base_model.model.encoder.block[0].layer[1].DenseReluDense.wo
    assert isinstance(wo, LoTRLinear) and wo.weight is wo.base_layer.weight  # T5 reads self.wo.weight
    assert (wo.in_features, wo.out_features) == (48, 32) and wo.bias is None
    assert "lm_head" not in adapted(model)  # all-linear leaves the output head alone
    randomise_peft_cores(model)
    out = model(input_ids=token_ids(), decoder_input_ids=token_ids(length=3)).logits
    assert out.shape == (2, 3, 64) and torch.isfinite(out).all()


def test_all_linear_leaves_the_head_of_modules_to_save_to_a_trained_full_copy():
    config = {"target_modules": "all-linear", "modules_to_save": ["classifier"]}  # no task_type
    model = lotr(tiny_bert(), rank=4, **config)  # rank 4 > num_labels 2: no rank error
    lora = get_peft_model(tiny_bert(), LoraConfig(r=4, **config))
    assert adapted(model) == sorted(
        n.removeprefix("base_model.model.") for n, m in lora.named_modules() if hasattr(m, "lora_A")
    )
    assert "classifier" not in adapted(model)
    head = model.base_model.model.classifier
    assert isinstance(head, ModulesToSaveWrapper)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad and "classifier" in n)
    assert trainable == [
        "base_model.model.classifier.modules_to_save.default.bias",
        "base_model.model.classifier.modules_to_save.default.weight",
    ]
    original = head.original_module.weight.detach().clone()
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(input_ids=token_ids(), labels=torch.tensor([0, 1])).loss.backward()
    optimizer.step()
    assert not torch.equal(head.modules_to_save["default"].weight, original)  # the full copy trained
    assert torch.equal(head.original_module.weight, original)


def test_refusals_leave_the_model_untouched():
    base = tiny_llama()
    with pytest.raises(ValueError, match=r"group 'q_proj' \(3 layers of 32x32.*cannot take rank \(80, 4\)"):
        lotr(base, rank=(80, 4))
    with pytest.raises(TypeError, match=r"'model.embed_tokens' \(Embedding\) is not supported"):
        lotr(base, target_modules=["embed_tokens"])
    assert not any(isinstance(m, LoTRLinear) for m in base.modules())
    with pytest.raises(ValueError, match=r"Target modules .* not found"):
        lotr(base, target_modules=["nothing_here"])
    with pytest.raises(ValueError, match="init must be one of"):
        LoTRPeftConfig(init="kaiming")


# --- saving and loading ---------------------------------------------------------------------------------------


def test_save_writes_a_peft_folder_that_peft_loads(tmp_path):
    model = lotr(tiny_llama(), rank=(4, 2), task_type="CAUSAL_LM")
    randomise_peft_cores(model)
    model.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"adapter_config.json", "adapter_model.safetensors", "README.md"}
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LOTR" and config["rank"] == [4, 2] and config["task_type"] == "CAUSAL_LM"
    keys = sorted(load_file(tmp_path / "adapter_model.safetensors"))
    assert keys[:4] == [
        "base_model.lotr_factors.q_proj.in_factor",
        "base_model.lotr_factors.q_proj.out_factor",
        "base_model.lotr_factors.v_proj.in_factor",
        "base_model.lotr_factors.v_proj.out_factor",
    ]
    assert keys[4:] == [
        f"base_model.model.model.layers.{i}.self_attn.{p}.lotr_cores" for i in (0, 1, 2) for p in ("q_proj", "v_proj")
    ]
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert type(reloaded).__name__ == "PeftModelForCausalLM"
    torch.testing.assert_close(logits(reloaded), logits(model), rtol=0, atol=0)
    assert reloaded.get_nb_trainable_parameters()[0] == 0  # loaded for inference, as in PEFT
    trainable = PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True, torch_device="cpu")
    assert trainable.get_nb_trainable_parameters() == model.get_nb_trainable_parameters()
    light = PeftModel.from_pretrained(tiny_llama(), tmp_path, low_cpu_mem_usage=True)
    torch.testing.assert_close(logits(light), logits(model), rtol=0, atol=0)


def test_auto_peft_models_load_the_base_named_in_the_config(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "base")
    from transformers import AutoModelForCausalLM

    model = lotr(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), task_type="CAUSAL_LM")
    randomise_peft_cores(model)
    model.save_pretrained(tmp_path / "adapter")
    loaded = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=0)

    classifier = tiny_bert()
    classifier.save_pretrained(tmp_path / "bert")
    from transformers import AutoModelForSequenceClassification

    bert = lotr(
        AutoModelForSequenceClassification.from_pretrained(tmp_path / "bert"),
        target_modules="all-linear",
        task_type="SEQ_CLS",
    )
    assert "classifier" not in adapted(bert)  # the head is trained in full, as PEFT does
    assert isinstance(bert.base_model.model.classifier, ModulesToSaveWrapper)
    assert bert.peft_config["default"].modules_to_save == ["classifier", "score"]  # PEFT's default; no score here
    randomise_peft_cores(bert)
    with torch.no_grad():
        bert.base_model.model.classifier.modules_to_save["default"].weight.add_(1.0)
    bert.save_pretrained(tmp_path / "bert-adapter")
    again = AutoPeftModelForSequenceClassification.from_pretrained(tmp_path / "bert-adapter")
    torch.testing.assert_close(logits(again), logits(bert), rtol=0, atol=0)


def test_state_dicts_drop_and_restore_the_adapter_name():
    model = lotr(tiny_llama())
    randomise_peft_cores(model)
    saved = get_peft_model_state_dict(model)
    assert all(".default" not in key for key in saved) and len(saved) == 10
    other = lotr(tiny_llama())
    other.add_adapter("second", LoTRPeftConfig(rank=4, target_modules=["q_proj", "v_proj"]))
    result = set_peft_model_state_dict(other, saved, adapter_name="second")
    assert not [k for k in result.unexpected_keys if "lotr" in k]
    other.set_adapter("second")
    torch.testing.assert_close(logits(other), logits(model), rtol=0, atol=0)


def test_one_folder_format_and_the_folders_peft_cannot_read(tmp_path):
    from builders import write_lora_pair

    import tensorlotr as tlr
    from tensorlotr.io.lotr_format import write_adapter

    model = lotr(tiny_llama(), rank=(4, 2), task_type="CAUSAL_LM")
    randomise_peft_cores(model)
    model.save_pretrained(tmp_path / "peft")
    expected = logits(model)
    lotr_model = tlr.LoTRModel.from_pretrained(tiny_llama(), tmp_path / "peft")  # PEFT's folder, tensorlotr's loader
    torch.testing.assert_close(logits(lotr_model), expected, rtol=0, atol=0)

    write_adapter(tmp_path / "old", lotr_model.adapter_files())  # the format of earlier tensorlotr versions
    assert (tmp_path / "old" / "lotr_config.json").is_file()
    old = tlr.LoTRModel.from_pretrained(tiny_llama(), tmp_path / "old")
    torch.testing.assert_close(logits(old), expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"Can't find 'adapter_config.json' at .*old"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path / "old")
    old.save_pretrained(tmp_path / "rewritten")  # rewritten in PEFT's format, it loads there too
    rewritten = PeftModel.from_pretrained(tiny_llama(), tmp_path / "rewritten")
    torch.testing.assert_close(logits(rewritten), expected, rtol=0, atol=0)

    pair = write_lora_pair(tmp_path / "pair")
    tlr.compress_zoo([pair / "first", pair / "second"], tmp_path / "zoo")
    with pytest.raises(ValueError, match=r"Can't find 'adapter_config.json' at .*zoo"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path / "zoo")
    zoo = tlr.LoTRModel.from_pretrained(tiny_llama(), tmp_path / "zoo")
    zoo.save_pretrained(tmp_path / "zoo-peft")  # each adapter, its shared factors copied: a PEFT folder
    second = PeftModel.from_pretrained(tiny_llama(), tmp_path / "zoo-peft" / "second")
    zoo.set_adapter("second")
    torch.testing.assert_close(logits(second), logits(zoo), atol=1e-6, rtol=1e-5)


def test_transformers_load_adapter_is_refused_as_for_every_shared_state_method(tmp_path):
    model = lotr(tiny_llama())
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"does not support .*LOTR because it uses shared state stored on the tuner"):
        tiny_llama().load_adapter(str(tmp_path))


# --- named adapters ----------------------------------------------------------------------------------------------


def test_add_set_and_delete_adapters(tmp_path):
    base = tiny_llama()
    before = logits(base)
    model = lotr(copy.deepcopy(base))
    randomise_peft_cores(model)
    first = logits(model)
    model.add_adapter("other", LoTRPeftConfig(rank=2, target_modules=["q_proj"]))
    factors = model.base_model.lotr_factors
    assert not any(p.requires_grad for p in factors["other"].parameters())  # added, not active: frozen
    assert all(p.requires_grad for p in factors["default"].parameters())
    torch.testing.assert_close(logits(model), first, rtol=0, atol=0)  # "other" starts at zero and is inactive
    model.set_adapter("other")
    assert all(p.requires_grad for p in factors["other"].parameters())
    assert not any(p.requires_grad for p in factors["default"].parameters())
    torch.testing.assert_close(logits(model), before)
    randomise_peft_cores(model, "other", seed=3)
    second = logits(model)
    model.save_pretrained(tmp_path)  # default in tmp_path, other in tmp_path/other
    assert (tmp_path / "other" / "adapter_model.safetensors").is_file()
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    loaded.load_adapter(tmp_path / "other", adapter_name="other")
    loaded.set_adapter("other")
    torch.testing.assert_close(logits(loaded), second, rtol=0, atol=0)
    model.delete_adapter("other")
    assert "other" not in model.base_model.lotr_factors and "other" not in model.peft_config
    assert not [k for k in model.state_dict() if ".other" in k]
    torch.testing.assert_close(logits(model), first, rtol=0, atol=0)


def test_deleting_an_adapter_unwraps_the_layers_only_it_adapted():
    model = lotr(tiny_llama())
    model.add_adapter("wide", LoTRPeftConfig(rank=2, target_modules="all-linear"))
    assert len(adapted(model)) == 21  # 3 layers of 7 linear layers
    layers = [m for m in model.modules() if isinstance(m, LoTRLinear)]
    assert all("wide" in m.lotr_cores for m in layers)  # the adapted q_proj and v_proj count as linear layers too
    model.delete_adapter("wide")
    assert adapted(model) == [f"model.layers.{i}.self_attn.{p}" for i in (0, 1, 2) for p in ("q_proj", "v_proj")]
    model.add_adapter("again", LoTRPeftConfig(rank=2, target_modules=["o_proj"]))  # the unwrapped layers adapt again
    assert len(adapted(model)) == 9


def test_disable_adapter_runs_the_base_and_restores_training():
    base = tiny_llama()
    model = lotr(copy.deepcopy(base))
    randomise_peft_cores(model)
    with model.disable_adapter():
        torch.testing.assert_close(logits(model), logits(base), rtol=0, atol=0)
        assert not any(p.requires_grad for p in model.base_model.lotr_factors.parameters())
    assert all(p.requires_grad for p in model.base_model.lotr_factors.parameters())
    assert not torch.allclose(logits(model), logits(base))
    model.set_requires_grad("default", requires_grad=False)
    assert not any(p.requires_grad for p in model.parameters())


def test_mixed_batches_run_one_adapter_per_sample():
    base = tiny_llama()
    model = lotr(copy.deepcopy(base)).eval()
    randomise_peft_cores(model)
    model.add_adapter("other", LoTRPeftConfig(rank=2, target_modules=["q_proj"]))
    randomise_peft_cores(model, "other", seed=5)
    x = token_ids(batch=3)
    mixed = model(input_ids=x, adapter_names=["default", "__base__", "other"]).logits
    torch.testing.assert_close(mixed[0], logits(model, x)[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[1], logits(base, x)[1], atol=1e-5, rtol=1e-5)
    model.set_adapter("other")
    torch.testing.assert_close(mixed[2], logits(model, x)[2], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="non-existing adapter"):
        model(input_ids=x, adapter_names=["default", "typo", "other"])
    names = ["default", "__base__", "other"]
    greedy = model.generate(input_ids=x, adapter_names=names, max_new_tokens=3, do_sample=False)
    beams = model.generate(input_ids=x, adapter_names=names, max_new_tokens=3, do_sample=False, num_beams=2)
    assert greedy.shape == beams.shape == (3, 10)
    assert torch.equal(model.generate(input_ids=x[2:], max_new_tokens=3, do_sample=False)[0], greedy[2])  # "other"


def test_mixed_batches_are_refused_while_an_adapter_is_merged_as_for_lora():
    message = "Cannot pass `adapter_names` when there are merged adapters, please call `unmerge_adapter` first."
    x = token_ids()
    for model in (lotr(tiny_llama()), get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))):
        model.eval()
        model.merge_adapter()
        for names in (["__base__", "__base__"], ["default", "__base__"]):
            with pytest.raises(ValueError, match=re.escape(message)):
                model(input_ids=x, adapter_names=names)
        model.unmerge_adapter()
        model(input_ids=x, adapter_names=["default", "__base__"])


def test_a_shared_group_computes_x_v_once_with_the_same_result():
    model = lotr(tiny_bert(), target_modules=["query", "value"], groups="shared", task_type="SEQ_CLS")
    assert list(model.base_model.lotr_groups["default"]) == ["query+value"]
    assert len(model.base_model._sharing_hooks) == 6  # three blocks: a pre-hook and a hook on each attention
    randomise_peft_cores(model)
    x = token_ids(batch=4, length=8)  # 32 rows: enough to share
    shared = logits(model, x)
    for handle in model.base_model._sharing_hooks:
        handle.remove()
    torch.testing.assert_close(logits(model, x), shared, rtol=0, atol=0)


def test_trainable_tokens_are_peft_s(tmp_path):
    model = lotr(tiny_llama(), trainable_token_indices=[5, 6])
    assert type(model.base_model.model.model.embed_tokens).__name__ == "TrainableTokensWrapper"
    assert model.get_nb_trainable_parameters()[0] == 32 * 4 * 3 + 16 * 4 + 6 * 16 + 2 * 32
    model.save_pretrained(tmp_path)
    assert "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta" in load_file(
        tmp_path / "adapter_model.safetensors"
    )
    PeftModel.from_pretrained(tiny_llama(), tmp_path)


# --- merging -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
def test_merge_and_unload_keeps_the_outputs(build):
    targets = ["c_attn", "c_proj"] if build is tiny_gpt2 else ["q_proj", "v_proj", "down_proj"]
    model = lotr(build(), target_modules=targets)
    randomise_peft_cores(model)
    expected = logits(model)
    model.merge_adapter()
    torch.testing.assert_close(logits(model), expected, atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()
    merged = model.merge_and_unload(safe_merge=True, adapter_names=["default"], progressbar=False)
    assert not any(isinstance(m, LoTRLinear) for m in merged.modules())
    torch.testing.assert_close(logits(merged), expected, atol=1e-5, rtol=1e-5)


def test_safe_merge_refuses_a_broken_adapter_and_unload_restores_the_base():
    base = tiny_llama()
    model = lotr(copy.deepcopy(base))
    with torch.no_grad():
        model.base_model.model.model.layers[0].self_attn.q_proj.lotr_cores["default"].fill_(float("nan"))
    with pytest.raises(ValueError, match="NaNs detected in the merged weights"):
        model.merge_and_unload(safe_merge=True)
    unloaded = model.unload()
    torch.testing.assert_close(logits(unloaded), logits(base), rtol=0, atol=0)


# --- add_weighted_adapter: exact for LoTR -------------------------------------------------------------------------


def _with_two_adapters(share: bool):
    model = lotr(tiny_llama(), rank=(4, 2))
    model.add_adapter("b", LoTRPeftConfig(rank=(4, 2), target_modules=["q_proj", "v_proj"]))
    factors = model.base_model.lotr_factors
    if share:  # adapter b on a's factors, as after training b's cores alone
        factors["b"].load_state_dict(factors["a" if "a" in factors else "default"].state_dict())
    randomise_peft_cores(model, "default", seed=1)
    randomise_peft_cores(model, "b", seed=2)
    return model


def _update(model, adapter, module="model.layers.1.self_attn.q_proj"):
    return model.base_model.model.get_submodule(module).get_delta_weight(adapter)


@pytest.mark.parametrize(("share", "how"), [(True, "linear"), (False, "cat"), (True, "cat")])
def test_add_weighted_adapter_is_exact(share, how):
    model = _with_two_adapters(share)
    model.add_weighted_adapter(["default", "b"], [0.75, -0.5], "mix", combination_type=how)
    for module in ("model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.q_proj"):
        expected = 0.75 * _update(model, "default", module) - 0.5 * _update(model, "b", module)
        torch.testing.assert_close(_update(model, "mix", module), expected, atol=1e-5, rtol=1e-5)
    rank = model.base_model.lotr_groups["mix"]["q_proj"].rank
    assert rank == ((4, 2) if how == "linear" else (8, 4))  # linear keeps the rank; cat adds the ranks
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".mix" in n)


def test_add_weighted_adapter_refuses_what_it_cannot_do_exactly():
    model = _with_two_adapters(share=False)
    with pytest.raises(ValueError, match=r"different U, V in group 'q_proj'.*combination_type='cat'"):
        model.add_weighted_adapter(["default", "b"], [0.5, 0.5], "mix")
    with pytest.raises(ValueError, match="combination_type 'svd' is not one of"):
        model.add_weighted_adapter(["default", "b"], [0.5, 0.5], "mix", combination_type="svd")
    assert "mix" not in model.peft_config


# --- dtypes ---------------------------------------------------------------------------------------------------------


def test_adapter_dtypes_follow_peft():
    bf16 = tiny_llama().to(torch.bfloat16)
    model = get_peft_model(bf16, LoTRPeftConfig(rank=4, target_modules=["q_proj"]))
    assert {p.dtype for n, p in model.named_parameters() if "lotr_" in n} == {torch.float32}  # PEFT's autocast
    kept = get_peft_model(
        tiny_llama().to(torch.bfloat16), LoTRPeftConfig(rank=4, target_modules=["q_proj"]), autocast_adapter_dtype=False
    )
    assert {p.dtype for n, p in kept.named_parameters() if "lotr_" in n} == {torch.bfloat16}
    assert logits(kept).dtype == torch.bfloat16


def test_peft_status_helpers_and_lora_conversion():
    model = lotr(tiny_llama())
    status = model.get_model_status()
    assert status.enabled is True and status.available_adapters == ["default"]
    assert status.peft_types == {"default": "LOTR"} and status.adapter_model_type == "LoTRTuner"
    layers = model.get_layer_status()
    assert len(layers) == 6 and layers[0].requires_grad == {"default": True}
    randomise_peft_cores(model)
    from peft import convert_to_lora

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lora_config, lora_state = convert_to_lora(model, rank=4)
    assert lora_config.r == 4 and lora_state
