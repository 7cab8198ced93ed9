"""LoTRModel (nn/model.py): attaching, parameters, gradients, merging, named adapters and mixed batches, vs PEFT."""

from __future__ import annotations

import pytest
import torch
from builders import (
    MODELS,
    TARGETS,
    inputs,
    logits,
    lotr_pair_model,
    meta_bert,
    peft_pair_model,
    randomise_cores,
    tiny_bert,
    tiny_gpt2,
    tiny_llama,
    train_steps,
    twin,
)

import tensorlotr as tlr
from tensorlotr.nn import LoTRLayer

# --- attaching one adapter -----------------------------------------------------------------


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


@pytest.mark.parametrize("arch", list(MODELS))
@pytest.mark.parametrize("init", ["zeros", "normal", "svd"])
def test_initial_outputs_equal_base(arch, init):
    model = MODELS[arch]()
    batch = inputs()
    with torch.no_grad():
        base = logits(model, batch)
        lotr = tlr.get_lotr_model(model, tlr.LoTRConfig(rank=4, target_modules=TARGETS[arch], init=init))
        torch.testing.assert_close(logits(lotr, batch), base, rtol=0, atol=0)


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
        unmerged = logits(lotr, batch)
        lotr.merge_adapter()
        merged = logits(lotr, batch)
        lotr.unmerge_adapter()
        again = logits(lotr, batch)
        torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=0)
        torch.testing.assert_close(again, unmerged, atol=1e-5, rtol=0)
        assert (merged - logits(twin_of_base(originals, arch), batch)).abs().max() > 1e-4  # the adapter did something
        base_state = lotr.get_base_model().state_dict()
        for key, value in originals.items():
            own = base_state.get(key, base_state.get(key.replace(".weight", ".base_layer.weight")))
            if own is None:
                own = base_state[key.rsplit(".", 1)[0] + ".base_layer." + key.rsplit(".", 1)[1]]
            torch.testing.assert_close(own, value, atol=1e-6, rtol=0)
        plain = lotr.merge_and_unload()
        assert not any(isinstance(m, LoTRLayer) for m in plain.modules())
        assert type(plain) is type(model)
        torch.testing.assert_close(logits(plain, batch), unmerged, atol=1e-5, rtol=0)


def twin_of_base(state, arch):
    model = MODELS[arch]()
    model.load_state_dict(state)
    return model


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
    randomise_cores(lotr, scale=0.3)
    lotr.train()
    lotr(**inputs()).logits.pow(2).mean().backward()
    for name, param in lotr.named_parameters():
        adapter = "lotr_" in name or ".ln_f." in name
        assert param.requires_grad == adapter, name
        assert (param.grad is not None) == adapter, name


def test_disable_adapter():
    model = tiny_bert()
    batch = inputs()
    with torch.no_grad():
        base = logits(model, batch)
    lotr = tlr.get_lotr_model(model, tlr.LoTRConfig(rank=4, target_modules=["query"]))
    randomise_cores(lotr, scale=0.3)
    with torch.no_grad():
        adapted = logits(lotr, batch)
        with lotr.disable_adapter():
            torch.testing.assert_close(logits(lotr, batch), base, atol=0, rtol=0)
        torch.testing.assert_close(logits(lotr, batch), adapted, atol=0, rtol=0)


def test_tucker_view_reconstructs_the_update():
    model = tiny_llama()
    lotr = tlr.get_lotr_model(model, tlr.LoTRConfig(rank=(4, 2), alpha=6, target_modules=["q_proj"]))
    randomise_cores(lotr, scale=0.3)
    tucker = lotr.tucker("q_proj")
    assert tucker.shape == (3, 32, 32) and tucker.rank == (4, 2)
    deltas = torch.stack([layer.delta_weight().detach() for _, layer in lotr.lotr_layers()])
    torch.testing.assert_close(tucker.to_dense(), deltas, atol=1e-6, rtol=0)
    assert lotr.lotr_layers().__next__()[1].scale == 6 / 2  # alpha / min(r_out, r_in)
    other = tlr.get_lotr_model(tiny_llama(), tlr.LoTRConfig(rank=(4, 2), alpha=6, target_modules=["q_proj"]))
    other.load_tucker("q_proj", tucker)
    torch.testing.assert_close(other.tucker("q_proj").to_dense(), deltas, atol=1e-6, rtol=0)


def test_state_dict_round_trip_in_memory():
    model = tiny_bert()
    lotr = tlr.get_lotr_model(model, tlr.LoTRConfig(rank=4, target_modules=["query"]))
    randomise_cores(lotr, scale=0.3)
    other = tlr.get_lotr_model(twin(tiny_bert()), tlr.LoTRConfig(rank=4, target_modules=["query"]))
    other.load_state_dict(lotr.state_dict())
    batch = inputs()
    with torch.no_grad():
        torch.testing.assert_close(logits(other, batch), logits(lotr, batch), atol=0, rtol=0)


def test_rank_and_alpha_patterns_by_module_regex_and_by_group():
    config = tlr.LoTRConfig(
        rank=4, alpha=8, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 16}
    )
    lotr = tlr.get_lotr_model(tiny_llama(0), config)
    assert lotr.groups["v_proj"].rank == (2, 2) and lotr.groups["q_proj"].rank == (4, 4)
    assert lotr.groups["q_proj"].scale == 16 / 4 and lotr.groups["v_proj"].scale == 8 / 2
    by_group = tlr.LoTRConfig(rank=4, target_modules=["q_proj"], rank_pattern={"q_proj": (3, 2)})
    assert tlr.get_lotr_model(tiny_llama(0), by_group).groups["q_proj"].rank == (3, 2)


def test_a_pattern_that_splits_a_group_is_refused():
    config = tlr.LoTRConfig(rank=4, target_modules=["q_proj"], rank_pattern={r"layers\.0\.self_attn\.q_proj": 2})
    with pytest.raises(ValueError, match=r"rank_pattern gives the modules of group 'q_proj' different values"):
        tlr.get_lotr_model(tiny_llama(0), config)
    with pytest.raises(ValueError, match="not a valid regular expression"):
        tlr.LoTRConfig(rank_pattern={"(": 2})


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


# --- what attaching refuses, before it allocates anything -----------------------------


def test_svd_init_on_a_meta_base_is_refused():
    config = tlr.LoTRConfig(rank=4, target_modules=["query"], init="svd")
    with pytest.raises(
        ValueError, match=r"init='svd'.*group 'query'.*'bert\.encoder\.layer\.0\..*query' is on the meta"
    ):
        tlr.get_lotr_model(meta_bert(), config)
    lotr = tlr.get_lotr_model(meta_bert(), tlr.LoTRConfig(rank=4, target_modules=["query"]))
    assert lotr.lotr_factors["query"].out_factor.is_meta  # zeros init follows the base's device


def test_a_second_adapter_on_the_same_model_is_refused():
    model = tiny_bert()
    lotr = tlr.get_lotr_model(model, tlr.LoTRConfig(rank=2, target_modules=["query"]))
    with pytest.raises(ValueError, match=r"already a LoTRModel with adapter groups \['query'\]"):
        tlr.get_lotr_model(lotr, tlr.LoTRConfig(rank=2, target_modules=["value"]))
    with pytest.raises(ValueError, match=r"already carries a LoTR adapter: 3 LoTRLayer modules \('bert\.encoder"):
        tlr.get_lotr_model(model, tlr.LoTRConfig(rank=2, target_modules=["value"]))
    assert lotr.lotr_factors["query"].out_factor.requires_grad  # the first adapter is untouched
    lotr.unload()
    tlr.get_lotr_model(model, tlr.LoTRConfig(rank=2, target_modules=["value"]))  # fine once removed


def test_ranks_above_what_the_modules_allow_are_refused(monkeypatch):
    def no_allocation(*args, **kwargs):
        raise AssertionError("factors were allocated before the rank was checked")

    monkeypatch.setattr(tlr.nn.model.LoTRFactors, "__init__", no_allocation)
    with pytest.raises(ValueError, match=r"group 'query' \(3 layers of 32x32.*rank \(1000000, 1000000\).*\(32, 32\)"):
        tlr.get_lotr_model(tiny_bert(), tlr.LoTRConfig(rank=10**6, target_modules=["query"]))
    # one 2x32 matrix: r_out <= min(2, 1*32) = 2 and r_in <= min(32, 1*2) = 2
    with pytest.raises(ValueError, match=r"group 'classifier' \(1 layers of 2x32.*rank \(2, 3\).*\(2, 2\)"):
        tlr.get_lotr_model(tiny_bert(), tlr.LoTRConfig(rank=(2, 3), target_modules=["classifier"]))


# --- named adapters and mixed-adapter batches, checked against PEFT ----------------------------


def test_named_adapters_switch_as_in_peft(peft_pair):
    peft, lotr = peft_pair_model(peft_pair), lotr_pair_model(peft_pair)
    assert lotr.active_adapter == "first" and lotr.active_adapters == ["first"]
    torch.testing.assert_close(logits(lotr, inputs(batch=4)), logits(peft, inputs(batch=4)), atol=1e-5, rtol=0)
    peft.set_adapter("second")
    lotr.set_adapter("second")
    assert lotr.active_adapter == "second"
    torch.testing.assert_close(logits(lotr, inputs(batch=4)), logits(peft, inputs(batch=4)), atol=1e-5, rtol=0)
    with peft.disable_adapter(), lotr.disable_adapter():
        torch.testing.assert_close(logits(lotr, inputs(batch=4)), logits(peft, inputs(batch=4)), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="no adapter"):
        lotr.set_adapter("third")


def test_add_train_and_delete_an_adapter():
    lotr = tlr.get_lotr_model(tiny_llama(0), tlr.LoTRConfig(rank=2, target_modules=["q_proj"]))
    lotr.add_adapter("extra", tlr.LoTRConfig(rank=3, target_modules=["q_proj", "v_proj"]))
    assert sorted(lotr.lotr_configs) == ["default", "extra"] and lotr.active_adapters == ["default"]
    trainable = {n for n, p in lotr.named_parameters() if p.requires_grad}
    assert trainable and all("extra" not in n for n in trainable)  # a new adapter starts inactive and frozen
    lotr.set_adapter("extra")
    trainable = {n for n, p in lotr.named_parameters() if p.requires_grad}
    assert trainable and all("extra" in n for n in trainable)
    assert lotr.groups["q_proj"].rank == (3, 3) and "extra--v_proj" in lotr.lotr_factors
    lotr.delete_adapter("extra")
    assert list(lotr.lotr_configs) == ["default"] and lotr.active_adapter == "default"
    assert not any("extra" in n for n, _ in lotr.named_parameters())
    assert not any("v_proj" in name for name, _ in lotr.lotr_layers())  # layers only that adapter had are gone


def test_get_lotr_model_on_a_wrapped_model_points_to_add_adapter():
    lotr = tlr.get_lotr_model(tiny_llama(0), tlr.LoTRConfig(rank=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="add_adapter"):
        tlr.get_lotr_model(lotr, tlr.LoTRConfig(rank=2, target_modules=["v_proj"]))
    with pytest.raises(ValueError, match="add_adapter"):
        tlr.get_lotr_model(lotr.base_model, tlr.LoTRConfig(rank=2, target_modules=["v_proj"]))
    for bad in ("copy", "keys", "a.b", "__base__"):
        with pytest.raises(ValueError, match="adapter name"):
            lotr.add_adapter(bad, tlr.LoTRConfig(rank=2, target_modules=["v_proj"]))


def test_mixed_batch_equals_each_sample_alone_and_peft(peft_pair):
    peft, lotr = peft_pair_model(peft_pair), lotr_pair_model(peft_pair)
    names = ["first", "second", "__base__", "second"]
    batch = inputs(seed=3, batch=4)
    mixed = logits(lotr, batch, adapter_names=names)
    for i, name in enumerate(names):
        single = {k: v[i : i + 1] for k, v in batch.items()}
        if name == "__base__":
            with lotr.disable_adapter():
                alone = logits(lotr, single)
        else:
            lotr.set_adapter(name)
            alone = logits(lotr, single)
        torch.testing.assert_close(mixed[i : i + 1], alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(mixed, logits(peft, batch, adapter_names=names), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="unknown adapters"):
        logits(lotr, batch, adapter_names=["first", "nope", "first", "first"])
    with pytest.raises(ValueError, match="4 samples"):
        logits(lotr, batch, adapter_names=["first"])


def test_mixed_batch_through_generate(peft_pair):
    lotr = lotr_pair_model(peft_pair)
    batch = inputs(seed=5, batch=2, length=4)
    names = ["second", "first"]
    with torch.no_grad():
        mixed = lotr.generate(**batch, adapter_names=names, max_new_tokens=4, do_sample=False, pad_token_id=0)
        for i, name in enumerate(names):
            lotr.set_adapter(name)
            single = {k: v[i : i + 1] for k, v in batch.items()}
            alone = lotr.generate(**single, max_new_tokens=4, do_sample=False, pad_token_id=0)
            # a sample that ends (token 0 is EOS) is padded with 0 in the batch
            assert torch.equal(mixed[i : i + 1, : alone.shape[1]], alone)
            assert not mixed[i, alone.shape[1] :].any()


def test_merging_acts_on_the_active_adapters(peft_pair):
    lotr = lotr_pair_model(peft_pair)
    lotr.set_adapter(["first", "second"])  # active updates add up
    both = logits(lotr, inputs(batch=4))
    lotr.merge_adapter()
    torch.testing.assert_close(logits(lotr, inputs(batch=4)), both, atol=1e-5, rtol=0)
    lotr.unmerge_adapter()
    lotr.set_adapter("first")
    torch.testing.assert_close(
        logits(lotr, inputs(batch=4)), logits(lotr_pair_model(peft_pair), inputs(batch=4)), atol=1e-6, rtol=0
    )
