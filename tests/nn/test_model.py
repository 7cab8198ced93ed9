"""Torch bindings on tiny BERT, RoBERTa, GPT-2 (Conv1D) and Llama models."""

from __future__ import annotations

import json

import pytest
import torch
from models import MODELS, TARGETS, inputs, tiny_bert, tiny_gpt2, tiny_llama, twin
from torch import nn

import tensorlotr as tlr
from tensorlotr.nn import LoTRLayer


def out(model, batch):
    result = model(**batch)
    return result.logits


def randomise_adapter(lotr: tlr.LoTRModel, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lotr.lotr_layers():
            layer.lotr_core.copy_(torch.randn(layer.lotr_core.shape, generator=generator) * 0.3)


def train_steps(lotr: tlr.LoTRModel, steps: int = 3) -> None:
    optimizer = torch.optim.Adam([p for p in lotr.parameters() if p.requires_grad], lr=1e-2)
    lotr.train()
    for step in range(steps):
        logits = out(lotr, inputs(seed=step))
        loss = logits.float().pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    lotr.eval()


@pytest.mark.parametrize("arch", list(MODELS))
def test_parameter_count_formula(arch):
    model = MODELS[arch]()
    config = tlr.LoTRConfig(rank=(4, 3), target_modules=TARGETS[arch])
    lotr = tlr.get_lotr_model(model, config)
    expected = 0
    for group in lotr.groups.values():
        (d_out, d_in), n_layers = group.shape, len(group.modules)
        expected += 4 * d_out + 3 * d_in + n_layers * 4 * 3
    assert lotr.get_nb_trainable_parameters()[0] == expected
    assert {name.rsplit("_", 1)[-1] if arch == "gpt2" else name for name in lotr.groups} == {
        t.rsplit("_", 1)[-1] if arch == "gpt2" else t for t in TARGETS[arch]
    }
    if arch == "gpt2":  # c_proj is in attn and mlp, with different shapes: two groups
        assert set(lotr.groups) == {"c_attn", "attn_c_proj", "mlp_c_proj"}


def test_parameter_count_with_modules_to_save():
    model = tiny_bert()
    lotr = tlr.get_lotr_model(model, tlr.LoTRConfig(rank=4, target_modules=["query"], modules_to_save=["classifier"]))
    head = sum(p.numel() for p in model.classifier.parameters())
    assert lotr.get_nb_trainable_parameters()[0] == 4 * 32 + 4 * 32 + 3 * 16 + head


@pytest.mark.parametrize("arch", list(MODELS))
@pytest.mark.parametrize("init", ["zeros", "normal", "svd"])
def test_initial_outputs_equal_base(arch, init):
    model = MODELS[arch]()
    batch = inputs()
    with torch.no_grad():
        base = out(model, batch)
        lotr = tlr.get_lotr_model(model, tlr.LoTRConfig(rank=4, target_modules=TARGETS[arch], init=init))
        torch.testing.assert_close(out(lotr, batch), base, rtol=0, atol=0)


def test_zero_init_factors_are_orthonormal_and_svd_init_spans_weights():
    model = tiny_llama()
    lotr = tlr.get_lotr_model(model, tlr.LoTRConfig(rank=4, target_modules=["q_proj"]))
    u = lotr.lotr_factors["q_proj"].out_factor.detach()
    torch.testing.assert_close(u.T @ u, torch.eye(4), atol=1e-6, rtol=0)
    model = tiny_llama()
    weights = torch.stack([layer.self_attn.q_proj.weight.detach().double() for layer in model.model.layers])
    lotr = tlr.get_lotr_model(model, tlr.LoTRConfig(rank=4, target_modules=["q_proj"], init="svd"))
    expected = tlr.tucker2(weights, 4).out_factor
    got = lotr.lotr_factors["q_proj"].out_factor.detach().double()
    torch.testing.assert_close(got.abs(), expected.abs(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", list(MODELS))
def test_merge_unmerge_and_unload(arch):
    model = MODELS[arch]()
    originals = {k: v.clone() for k, v in model.state_dict().items()}
    lotr = tlr.get_lotr_model(model, tlr.LoTRConfig(rank=4, target_modules=TARGETS[arch]))
    train_steps(lotr)
    batch = inputs(seed=9)
    with torch.no_grad():
        unmerged = out(lotr, batch)
        lotr.merge_adapter()
        merged = out(lotr, batch)
        lotr.unmerge_adapter()
        again = out(lotr, batch)
        torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=0)
        torch.testing.assert_close(again, unmerged, atol=1e-5, rtol=0)
        assert (merged - out(twin_of_base(originals, arch), batch)).abs().max() > 1e-4  # the adapter did something
        base_state = lotr.get_base_model().state_dict()
        for key, value in originals.items():
            own = base_state.get(key, base_state.get(key.replace(".weight", ".base_layer.weight")))
            if own is None:
                own = base_state[key.rsplit(".", 1)[0] + ".base_layer." + key.rsplit(".", 1)[1]]
            torch.testing.assert_close(own, value, atol=1e-6, rtol=0)
        plain = lotr.merge_and_unload()
        assert not any(isinstance(m, LoTRLayer) for m in plain.modules())
        assert type(plain) is type(model)
        torch.testing.assert_close(out(plain, batch), unmerged, atol=1e-5, rtol=0)


def twin_of_base(state, arch):
    model = MODELS[arch]()
    model.load_state_dict(state)
    return model


@pytest.mark.parametrize("arch", list(MODELS))
def test_save_and_load_on_fresh_base(arch, tmp_path):
    model = MODELS[arch]()
    fresh = twin(model)
    config = tlr.LoTRConfig(rank=(3, 5), target_modules=TARGETS[arch], modules_to_save=None)
    lotr = tlr.get_lotr_model(model, config)
    train_steps(lotr)
    lotr.save_pretrained(tmp_path / "adapter")
    saved = sorted(p.name for p in (tmp_path / "adapter").iterdir())  # the adapter's two files and its model card
    assert saved == ["README.md", "lotr_config.json", "lotr_model.safetensors"]
    loaded = tlr.LoTRModel.from_pretrained(fresh, tmp_path / "adapter")
    batch = inputs(seed=4)
    with torch.no_grad():
        torch.testing.assert_close(out(loaded, batch), out(lotr, batch), atol=0, rtol=0)
    assert loaded.get_nb_trainable_parameters()[0] == 0
    trainable = tlr.LoTRModel.from_pretrained(MODELS[arch](), tmp_path / "adapter", is_trainable=True)
    assert trainable.get_nb_trainable_parameters()[0] == lotr.get_nb_trainable_parameters()[0]


def test_modules_to_save_are_restored(tmp_path):
    model = tiny_bert(seed=0)
    lotr = tlr.get_lotr_model(
        model, tlr.LoTRConfig(rank=4, target_modules=["query", "value"], modules_to_save=["classifier"])
    )
    train_steps(lotr)
    lotr.save_pretrained(tmp_path)
    fresh = tiny_bert(seed=0)
    with torch.no_grad():
        fresh.classifier.weight.normal_()  # a new, different head
    loaded = tlr.LoTRModel.from_pretrained(fresh, tmp_path)
    batch = inputs()
    with torch.no_grad():
        torch.testing.assert_close(out(loaded, batch), out(lotr, batch), atol=0, rtol=0)


def test_shared_factors_stored_once():
    model = tiny_bert()
    lotr = tlr.get_lotr_model(model, tlr.LoTRConfig(rank=4, target_modules=["query", "value"], groups="shared"))
    assert list(lotr.groups) == ["query+value"]
    layers = [layer for _, layer in lotr.lotr_layers()]
    assert len(layers) == 6
    assert all(layer.factors.out_factor is layers[0].factors.out_factor for layer in layers)
    keys = [k for k in lotr.state_dict() if k.endswith("out_factor")]
    assert keys == ["lotr_factors.query+value.out_factor"]
    params = [p for p in lotr.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.1)
    ids = [id(p) for group in optimizer.param_groups for p in group["params"]]
    assert ids.count(id(layers[0].factors.out_factor)) == 1
    assert len(params) == 2 + 6


def test_only_adapter_parameters_receive_gradients():
    model = tiny_gpt2()
    lotr = tlr.get_lotr_model(model, tlr.LoTRConfig(rank=4, target_modules=["c_attn"], modules_to_save=["ln_f"]))
    randomise_adapter(lotr)
    lotr.train()
    out(lotr, inputs()).pow(2).mean().backward()
    for name, param in lotr.named_parameters():
        adapter = "lotr_" in name or ".ln_f." in name
        assert param.requires_grad == adapter, name
        assert (param.grad is not None) == adapter, name


def test_disable_adapter():
    model = tiny_bert()
    batch = inputs()
    with torch.no_grad():
        base = out(model, batch)
    lotr = tlr.get_lotr_model(model, tlr.LoTRConfig(rank=4, target_modules=["query"]))
    randomise_adapter(lotr)
    with torch.no_grad():
        adapted = out(lotr, batch)
        with lotr.disable_adapter():
            torch.testing.assert_close(out(lotr, batch), base, atol=0, rtol=0)
        torch.testing.assert_close(out(lotr, batch), adapted, atol=0, rtol=0)


def test_tucker_view_reconstructs_the_update():
    model = tiny_llama()
    lotr = tlr.get_lotr_model(model, tlr.LoTRConfig(rank=(4, 2), alpha=6, target_modules=["q_proj"]))
    randomise_adapter(lotr)
    tucker = lotr.tucker("q_proj")
    assert tucker.shape == (3, 32, 32) and tucker.rank == (4, 2)
    deltas = torch.stack([layer.delta_weight().detach() for _, layer in lotr.lotr_layers()])
    torch.testing.assert_close(tucker.to_dense(), deltas, atol=1e-6, rtol=0)
    assert lotr.lotr_layers().__next__()[1].scale == 6 / 2  # alpha / min(r_out, r_in)
    other = tlr.get_lotr_model(tiny_llama(), tlr.LoTRConfig(rank=(4, 2), alpha=6, target_modules=["q_proj"]))
    other.load_tucker("q_proj", tucker)
    torch.testing.assert_close(other.tucker("q_proj").to_dense(), deltas, atol=1e-6, rtol=0)


def test_layers_to_transform_and_regex_targets():
    model = tiny_llama()
    lotr = tlr.get_lotr_model(model, tlr.LoTRConfig(rank=2, target_modules=["q_proj"], layers_to_transform=[0, 2]))
    assert lotr.groups["q_proj"].modules == ["model.layers.0.self_attn.q_proj", "model.layers.2.self_attn.q_proj"]
    lotr = tlr.get_lotr_model(tiny_llama(), tlr.LoTRConfig(rank=2, target_modules=r".*\.(q|k)_proj"))
    assert set(lotr.groups) == {"q_proj", "k_proj"}


def test_explicit_groups():
    model = tiny_llama()
    groups = {"attn": ["q_proj", "o_proj"], "mlp_in": ["gate_proj", "up_proj"]}
    lotr = tlr.get_lotr_model(model, tlr.LoTRConfig(rank=2, groups=groups))
    assert set(lotr.groups) == {"attn", "mlp_in"}
    assert len(lotr.groups["attn"].modules) == 6


def test_config_json_round_trip(tmp_path):
    config = tlr.LoTRConfig(rank=(4, 2), alpha=3.0, target_modules=["q"], groups={"g": ["q"]}, rank_pattern={"g": 5})
    data = json.loads(json.dumps(config.to_dict()))
    assert tlr.LoTRConfig.from_dict(data) == config


def test_state_dict_round_trip_in_memory():
    model = tiny_bert()
    lotr = tlr.get_lotr_model(model, tlr.LoTRConfig(rank=4, target_modules=["query"]))
    randomise_adapter(lotr)
    other = tlr.get_lotr_model(twin(tiny_bert()), tlr.LoTRConfig(rank=4, target_modules=["query"]))
    other.load_state_dict(lotr.state_dict())
    batch = inputs()
    with torch.no_grad():
        torch.testing.assert_close(out(other, batch), out(lotr, batch), atol=0, rtol=0)


# --- bad input ---------------------------------------------------------------------


def test_targets_that_match_nothing_list_close_names():
    with pytest.raises(ValueError, match=r"match no nn.Linear.*close names: \['query'\]"):
        tlr.get_lotr_model(tiny_bert(), tlr.LoTRConfig(target_modules=["querry"]))


def test_group_with_mixed_shapes_names_modules():
    config = tlr.LoTRConfig(rank=2, groups={"mixed": ["q_proj", "down_proj"]})
    with pytest.raises(ValueError, match=r"group 'mixed' mixes weight shapes.*q_proj 32x32.*down_proj 32x40"):
        tlr.get_lotr_model(tiny_llama(), config)


def test_adapter_on_base_of_other_shapes(tmp_path):
    lotr = tlr.get_lotr_model(tiny_bert(), tlr.LoTRConfig(rank=2, target_modules=["query"]))
    lotr.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"expects module .*query' of shape 32x32.*model's is"):
        tlr.LoTRModel.from_pretrained(_wider_bert(), tmp_path)
    with pytest.raises(ValueError, match="which the model lacks"):
        tlr.LoTRModel.from_pretrained(tiny_llama(), tmp_path)


def _wider_bert():
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=64, hidden_size=48, num_hidden_layers=3, num_attention_heads=4, intermediate_size=48)
    return BertForSequenceClassification(config)


def test_unsupported_layer_types():
    with pytest.raises(ValueError, match=r"word_embeddings' is a Embedding; LoTR adapts nn.Linear"):
        tlr.get_lotr_model(tiny_bert(), tlr.LoTRConfig(target_modules=["word_embeddings"]))
    with pytest.raises(ValueError, match="LayerNorm"):
        tlr.get_lotr_model(tiny_bert(), tlr.LoTRConfig(target_modules=r".*attention\.output\.LayerNorm"))


def test_bad_config_values():
    with pytest.raises(ValueError, match="init must be"):
        tlr.LoTRConfig(init="xavier")
    with pytest.raises(ValueError, match="rank must be positive"):
        tlr.LoTRConfig(rank=0)
    with pytest.raises(ValueError, match="groups must be"):
        tlr.LoTRConfig(groups="everything")
    with pytest.raises(ValueError, match="unknown LoTRConfig fields"):
        tlr.LoTRConfig.from_dict({"rank": 2, "r": 3})


def test_missing_and_corrupt_adapter_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"lotr_config\.json is missing"):
        tlr.LoTRModel.from_pretrained(tiny_bert(), tmp_path)
    lotr = tlr.get_lotr_model(tiny_bert(), tlr.LoTRConfig(rank=2, target_modules=["query"]))
    lotr.save_pretrained(tmp_path)
    weights = tmp_path / "lotr_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match="cannot be read as safetensors"):
        tlr.LoTRModel.from_pretrained(tiny_bert(), tmp_path)


def test_conv1d_merge_orientation():
    model = tiny_gpt2()
    lotr = tlr.get_lotr_model(model, tlr.LoTRConfig(rank=4, target_modules=["c_attn"]))
    randomise_adapter(lotr)
    _, layer = next(lotr.lotr_layers())
    x = torch.randn(5, 32)
    with torch.no_grad():
        expected = layer(x)
        layer.merge()
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=0)
        assert isinstance(layer.base_layer, nn.Module) and layer.fan_in_fan_out
