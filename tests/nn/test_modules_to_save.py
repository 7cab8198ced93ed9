"""modules_to_save with PEFT's semantics: a trained copy beside the original."""

from __future__ import annotations

import pytest
import torch
from builders import inputs, logits, tiny_bert, tiny_gpt2, tiny_llama, train_steps, twin
from safetensors.torch import load_file

import tensorlotr as tlr
from tensorlotr.nn import LoTRLayer


def tied_llama(seed: int = 0) -> torch.nn.Module:
    """The tiny Llama with 2 layers, its head tied to its input embedding (transformers' default special tokens)."""
    return tiny_llama(
        seed, num_hidden_layers=2, tie_word_embeddings=True, pad_token_id=None, bos_token_id=1, eos_token_id=2
    )


TIED = {  # model factory, adapter targets, input embedding path
    "gpt2": (tiny_gpt2, ["c_attn"], "transformer.wte"),
    "llama": (tied_llama, ["q_proj", "v_proj"], "model.embed_tokens"),
}


def test_disable_adapter_runs_the_original_head():
    model = tiny_bert()
    base = logits(model)
    head = model.classifier
    lotr = tlr.get_lotr_model(model, tlr.LoTRConfig(rank=4, target_modules=["query"], modules_to_save=["classifier"]))
    assert model.classifier is not head and lotr.original_modules[0] is head
    assert all(p.requires_grad for p in model.classifier.parameters())
    assert not any(p.requires_grad for p in head.parameters())
    head_before = {k: v.clone() for k, v in head.state_dict().items()}
    train_steps(lotr, lr=5e-2)
    trained = logits(lotr)
    assert (trained - base).abs().max() > 1e-3
    for key, value in head.state_dict().items():
        torch.testing.assert_close(value, head_before[key], atol=0, rtol=0)
    with lotr.disable_adapter():
        assert lotr.base_model.classifier is head
        torch.testing.assert_close(logits(lotr), base, atol=0, rtol=0)
    torch.testing.assert_close(logits(lotr), trained, atol=0, rtol=0)


@pytest.mark.parametrize("arch", list(TIED))
def test_tied_embeddings_never_change_through_the_copy(arch, tmp_path):
    factory, targets, embedding = TIED[arch]
    model = factory()
    pristine = twin(model)
    base = logits(model)
    embed = model.get_submodule(embedding).weight
    assert model.lm_head.weight is embed  # tied
    embed_before = embed.detach().clone()
    lotr = tlr.get_lotr_model(model, tlr.LoTRConfig(rank=4, target_modules=targets, modules_to_save=["lm_head"]))
    assert model.lm_head.weight is not embed and model.get_submodule(embedding).weight is embed
    train_steps(lotr, lr=5e-2)
    torch.testing.assert_close(embed.detach(), embed_before, atol=0, rtol=0)
    assert lotr.original_modules[0].weight is embed  # the original head is still tied
    assert (model.lm_head.weight.detach() - embed_before).abs().max() > 1e-3
    with lotr.disable_adapter():
        torch.testing.assert_close(logits(lotr), base, atol=0, rtol=0)

    lotr.save_pretrained(tmp_path)
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.lm_head.weight" in saved  # the plain parameter path, as PEFT saves it
    assert not any(".lotr_" not in k and k != "base_model.model.lm_head.weight" for k in saved)
    loaded = tlr.LoTRModel.from_pretrained(pristine, tmp_path)
    torch.testing.assert_close(logits(loaded), logits(lotr), atol=0, rtol=0)
    torch.testing.assert_close(pristine.get_submodule(embedding).weight.detach(), embed_before, atol=0, rtol=0)
    with loaded.disable_adapter():
        torch.testing.assert_close(logits(loaded), base, atol=0, rtol=0)


def test_a_target_that_is_also_in_modules_to_save_is_trained_in_full_not_adapted():
    # PEFT's rule: a module of modules_to_save is wrapped and trained in full, never adapted
    config = tlr.LoTRConfig(rank=4, target_modules=["query"], modules_to_save=["query"])
    with pytest.raises(ValueError, match=r"match only modules of modules_to_save \['query'\].*trained in full"):
        tlr.get_lotr_model(tiny_bert(), config)


def test_merge_and_unload_keeps_the_trained_copies():
    model = tiny_bert()
    lotr = tlr.get_lotr_model(model, tlr.LoTRConfig(rank=4, target_modules=["query"], modules_to_save=["classifier"]))
    train_steps(lotr, lr=5e-2)
    trained = logits(lotr)
    copy = model.classifier
    plain = lotr.merge_and_unload()
    assert plain.classifier is copy and len(lotr.original_modules) == 0
    assert not any(isinstance(m, LoTRLayer) for m in plain.modules())
    torch.testing.assert_close(logits(plain), trained, atol=1e-5, rtol=0)


def test_modules_inside_a_module_of_modules_to_save_are_not_adapted():
    config = tlr.LoTRConfig(rank=2, target_modules=["query"], modules_to_save=["layer.0.attention"])
    lotr = tlr.get_lotr_model(tiny_bert(), config)
    model = lotr.get_base_model()
    assert not isinstance(model.bert.encoder.layer[0].attention.self.query, LoTRLayer)
    assert all(isinstance(model.bert.encoder.layer[i].attention.self.query, LoTRLayer) for i in (1, 2))
    trainable = {n for n, p in lotr.named_parameters() if p.requires_grad}
    assert any("layer.0.attention" in n and "query.weight" in n for n in trainable)


def test_saved_tensor_of_a_module_outside_modules_to_save_is_refused(tmp_path):
    lotr = tlr.get_lotr_model(tiny_bert(), tlr.LoTRConfig(rank=2, target_modules=["query"]))
    files = lotr.adapter_files()
    files.tensors["modules_to_save.classifier.weight"] = torch.zeros(2, 32)
    with pytest.raises(ValueError, match=r"saves 'classifier.weight' \(modules_to_save\).*none of its modules_to_save"):
        tlr.LoTRModel.from_adapter_files(tiny_bert(), files)


def test_parameter_count_with_modules_to_save():
    model = tiny_bert()
    lotr = tlr.get_lotr_model(model, tlr.LoTRConfig(rank=4, target_modules=["query"], modules_to_save=["classifier"]))
    head = sum(p.numel() for p in model.classifier.parameters())
    assert lotr.get_nb_trainable_parameters()[0] == 4 * 32 + 4 * 32 + 3 * 16 + head


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
        torch.testing.assert_close(logits(loaded, batch), logits(lotr, batch), atol=0, rtol=0)
