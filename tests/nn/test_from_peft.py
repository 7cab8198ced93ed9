"""One LoRA-to-LoTR path below the jobs (nn/from_peft.py): ``LoTRModel.from_peft_model`` and ``LoTRModel.from_lora``."""

from __future__ import annotations

import peft
import pytest
import torch
from builders import inputs, logits, tiny_bert, tiny_gpt2, tiny_llama
from peft import PeftModel

import tensorlotr as tlr
from tensorlotr import LoTRModel

INPUTS = {"input_ids": torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])}


def trained_lora(r: int = 2, **kwargs) -> peft.PeftModel:
    """A PEFT LoRA on query and value, B and the head set at random as after training."""
    torch.manual_seed(0)
    config = peft.LoraConfig(r=r, lora_alpha=4, target_modules=["query", "value"], modules_to_save=["classifier"])
    for key, value in kwargs.items():
        setattr(config, key, value)
    lora = peft.get_peft_model(tiny_bert(0, max_position_embeddings=512), config)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.normal_(0, 0.2)
    return lora


@pytest.mark.parametrize("rank", [6, 8])  # 6: the exact rank of 3 layers of rank 2; 8: padded
def test_same_function_at_the_exact_rank_and_above(rank):
    lora = trained_lora()
    expected = lora(**INPUTS).logits
    head = lora.base_model.model.classifier.modules_to_save["default"].weight.detach().clone()
    lotr = LoTRModel.from_peft_model(lora, rank=rank).eval()
    assert list(lotr.groups) == ["query", "value"] and lotr.groups["query"].rank == (rank, rank)
    assert max(lotr.conversion_errors.values()) < 1e-6
    torch.testing.assert_close(lotr(**INPUTS).logits, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lotr.get_base_model().classifier.weight, head)
    u = lotr.tucker("query").out_factor
    torch.testing.assert_close(u.T @ u, torch.eye(rank), atol=1e-5, rtol=0)  # padded columns orthonormal too
    assert not any(n.endswith(("lora_A.default.weight", "lora_B.default.weight")) for n, _ in lotr.named_parameters())


def test_a_lower_rank_truncates_and_training_goes_on():
    lora = trained_lora()
    lotr = LoTRModel.from_peft_model(lora, rank=2)  # the LoRA's r; the default is the exact rank
    assert lotr.groups["value"].rank == (2, 2)
    assert 0.0 < lotr.conversion_errors["value"] < 1.0
    trainable = {n for n, p in lotr.named_parameters() if p.requires_grad}
    assert any("lotr_factors" in n for n in trainable) and any("lotr_cores" in n for n in trainable)
    assert any("classifier" in n for n in trainable)
    optimizer = torch.optim.AdamW([p for p in lotr.parameters() if p.requires_grad], lr=1e-2)
    labels = torch.tensor([0, 1])
    before = lotr(**INPUTS, labels=labels).loss
    before.backward()
    optimizer.step()
    assert lotr(**INPUTS, labels=labels).loss.item() != before.item()


def test_conv1d_orientation():
    """GPT-2's Conv1D stores weights transposed; PEFT's LoRA there uses fan_in_fan_out."""
    gpt2 = tiny_gpt2(0, n_layer=2, n_positions=16)
    lora = peft.get_peft_model(gpt2, peft.LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True, lora_alpha=8))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    expected = lora(**INPUTS).logits
    lotr = LoTRModel.from_peft_model(lora, rank=4).eval()
    torch.testing.assert_close(lotr(**INPUTS).logits, expected, atol=1e-5, rtol=1e-5)


def test_an_explicit_config_and_frozen_result():
    lora = trained_lora()
    expected = lora(**INPUTS).logits
    config = tlr.LoTRConfig(
        rank=6, alpha=6, target_modules=["query", "value"], groups="shared", modules_to_save=["classifier"]
    )
    lotr = LoTRModel.from_peft_model(lora, config, is_trainable=False)
    assert list(lotr.groups) == ["query+value"] and not lotr.training
    assert lotr.get_nb_trainable_parameters()[0] == 0
    # shared query+value: 6 layers of rank 2, exact rank 12 > 6, so not exact
    assert lotr.conversion_errors["query+value"] > 1e-3
    assert lotr(**INPUTS).logits.shape == expected.shape


def test_refusals():
    with pytest.raises(TypeError, match="PeftModel"):
        LoTRModel.from_peft_model(tiny_bert(max_position_embeddings=512))
    vera = peft.get_peft_model(tiny_bert(max_position_embeddings=512), peft.VeraConfig(r=4, target_modules=["query"]))
    with pytest.raises(ValueError, match="not a LoRA"):
        LoTRModel.from_peft_model(vera)
    with pytest.raises(ValueError, match="DoRA"):
        LoTRModel.from_peft_model(trained_lora(use_dora=True))
    lora = trained_lora()
    with pytest.raises(ValueError, match="does not adapt"):
        LoTRModel.from_peft_model(lora, tlr.LoTRConfig(rank=2, target_modules=["query", "key"]))
    assert any("lora_A" in n for n, _ in lora.named_parameters())  # refused before anything was unloaded
    with pytest.raises(ValueError, match="either config or rank"):
        LoTRModel.from_peft_model(trained_lora(), tlr.LoTRConfig(rank=2, target_modules=["query"]), rank=2)


def test_the_default_rank_is_exact_as_in_convert_lora():
    lora = trained_lora()
    expected = lora(**INPUTS).logits
    lotr = LoTRModel.from_peft_model(lora).eval()  # no rank: exact, as convert_lora
    assert lotr.groups["value"].rank == (6, 6)
    assert max(lotr.conversion_errors.values()) < 1e-6
    torch.testing.assert_close(lotr(**INPUTS).logits, expected, atol=1e-5, rtol=1e-5)


def test_a_standard_seq_cls_lora_converts():
    # PEFT's SEQ_CLS default lists both classifier and score, and wraps only those that exist
    torch.manual_seed(0)
    config = peft.LoraConfig(task_type="SEQ_CLS", r=2, lora_alpha=4, target_modules=["query", "value"])
    lora = peft.get_peft_model(tiny_bert(0, max_position_embeddings=512), config)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.normal_(0, 0.2)
    expected = lora(**INPUTS).logits
    lotr = LoTRModel.from_peft_model(lora).eval()
    torch.testing.assert_close(lotr(**INPUTS).logits, expected, atol=1e-5, rtol=1e-5)
    assert any("classifier" in n for n, p in lotr.named_parameters() if p.requires_grad)


# --- from a PEFT LoRA folder ------------------------------------------------------------------


def test_from_lora_converts_in_memory(peft_pair):
    lotr = tlr.LoTRModel.from_lora(tiny_llama(0), peft_pair / "first")
    peft = PeftModel.from_pretrained(tiny_llama(0), peft_pair / "first").eval()
    torch.testing.assert_close(logits(lotr, inputs(batch=4)), logits(peft, inputs(batch=4)), atol=1e-5, rtol=0)
    assert lotr.conversion_report.relative_error < 1e-5
    small = tlr.LoTRModel.from_lora(tiny_llama(0), peft_pair / "first", rank=2)
    assert all(g.rank == (2, 2) for g in small.groups.values())
