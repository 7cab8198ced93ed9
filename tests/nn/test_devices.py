"""Devices, dtypes and loading: .to(), meta-device bases, device_map and low_cpu_mem_usage loading.

Also what attaching refuses before it allocates anything: a second adapter, and ranks above
what the targeted modules allow.
"""

from __future__ import annotations

import pytest
import torch
from accelerate import init_empty_weights
from models import inputs, tiny_bert, twin
from transformers import AutoModelForSequenceClassification

import tensorlotr as tlr

CONFIG = dict(rank=4, target_modules=["query", "value"], modules_to_save=["classifier"])


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs()).logits


def randomise(lotr: tlr.LoTRModel, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in lotr.parameters():
            if param.requires_grad:
                param.add_(0.3 * torch.randn(param.shape, generator=generator))


def adapter_tensors(lotr: tlr.LoTRModel) -> dict[str, torch.Tensor]:
    return lotr.adapter_files().tensors


def meta_bert() -> torch.nn.Module:
    with init_empty_weights():
        return AutoModelForSequenceClassification.from_config(tiny_bert().config)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny BERT saved as a transformers folder, and a trained adapter for it."""
    folder = tmp_path_factory.mktemp("devices")
    model = tiny_bert()
    model.save_pretrained(folder / "base")
    lotr = tlr.get_lotr_model(twin(model), tlr.LoTRConfig(**CONFIG))
    randomise(lotr)
    lotr.save_pretrained(folder / "adapter")
    return folder, lotr


def test_factors_cores_and_copies_follow_dtype_casts(saved, tmp_path):
    _, trained = saved
    lotr = tlr.get_lotr_model(tiny_bert(), tlr.LoTRConfig(**CONFIG))
    lotr.load_adapter_tensors(trained.adapter_files())
    expected = logits(lotr).double()
    lotr.to(torch.float64)
    assert {t.dtype for t in adapter_tensors(lotr).values()} == {torch.float64}
    assert {p.dtype for p in lotr.original_modules.parameters()} == {torch.float64}
    torch.testing.assert_close(logits(lotr), expected, atol=1e-5, rtol=0)
    lotr.save_pretrained(tmp_path)
    loaded = tlr.LoTRModel.from_pretrained(tiny_bert(), tmp_path)  # float64 files into a float32 adapter
    assert {t.dtype for t in adapter_tensors(loaded).values()} == {torch.float32}
    torch.testing.assert_close(logits(loaded), expected.float(), atol=1e-5, rtol=0)
    lotr.float()
    assert {t.dtype for t in adapter_tensors(lotr).values()} == {torch.float32}


def test_a_model_moved_to_meta_cannot_save_and_loading_materialises(saved, tmp_path):
    folder, trained = saved
    lotr = tlr.get_lotr_model(tiny_bert(), tlr.LoTRConfig(**CONFIG)).to("meta")
    with pytest.raises(ValueError, match=r"adapter tensor 'factors\.query\.out_factor' is on the meta device"):
        lotr.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()
    lotr.load_adapter(folder / "adapter")
    got, want = adapter_tensors(lotr), adapter_tensors(trained)
    assert got.keys() == want.keys()
    for key, tensor in got.items():
        assert tensor.device.type == "cpu", key
        torch.testing.assert_close(tensor, want[key], atol=0, rtol=0)
    assert lotr.lotr_factors["query"].out_factor.requires_grad  # a trainable adapter stays trainable
    assert lotr.base_model.bert.embeddings.word_embeddings.weight.is_meta  # the base is left as it was


def test_meta_base_loads_every_adapter_tensor_from_the_file(saved):
    folder, trained = saved
    lotr = tlr.LoTRModel.from_pretrained(meta_bert(), folder / "adapter")
    got, want = adapter_tensors(lotr), adapter_tensors(trained)
    for key, tensor in got.items():
        torch.testing.assert_close(tensor, want[key], atol=0, rtol=0)
    assert not any(p.requires_grad for p in lotr.parameters())
    files = trained.adapter_files()
    del files.tensors["modules_to_save.classifier.bias"]
    with pytest.raises(ValueError, match=r"no values for 1 adapter tensors on the meta device.*classifier\.bias"):
        tlr.LoTRModel.from_adapter_files(meta_bert(), files)


def test_loading_changes_nothing_unless_every_tensor_fits(saved):
    _, trained = saved
    lotr = tlr.get_lotr_model(tiny_bert(), tlr.LoTRConfig(**CONFIG))
    before = {k: v.clone() for k, v in adapter_tensors(lotr).items()}
    files = trained.adapter_files()
    files.tensors["modules_to_save.classifier.weight"] = torch.zeros(3, 32)
    with pytest.raises(
        ValueError, match=r"'modules_to_save\.classifier\.weight' of shape \(3, 32\).*model's is \(2, 32\)"
    ):
        lotr.load_adapter_tensors(files)
    for key, tensor in adapter_tensors(lotr).items():
        torch.testing.assert_close(tensor, before[key], atol=0, rtol=0)


def test_svd_init_on_a_meta_base_is_refused():
    config = tlr.LoTRConfig(rank=4, target_modules=["query"], init="svd")
    with pytest.raises(
        ValueError, match=r"init='svd'.*group 'query'.*'bert\.encoder\.layer\.0\..*query' is on the meta"
    ):
        tlr.get_lotr_model(meta_bert(), config)
    lotr = tlr.get_lotr_model(meta_bert(), tlr.LoTRConfig(rank=4, target_modules=["query"]))
    assert lotr.lotr_factors["query"].out_factor.is_meta  # zeros init follows the base's device


@pytest.mark.parametrize("load", [{"device_map": "cpu"}, {"low_cpu_mem_usage": True}])
def test_bases_loaded_with_device_map_or_low_cpu_mem_usage(saved, load):
    folder, trained = saved
    base = AutoModelForSequenceClassification.from_pretrained(folder / "base", **load).eval()
    lotr = tlr.LoTRModel.from_pretrained(base, folder / "adapter")
    assert {t.device.type for t in adapter_tensors(lotr).values()} == {"cpu"}
    torch.testing.assert_close(logits(lotr), logits(trained), atol=0, rtol=0)
    fresh = AutoModelForSequenceClassification.from_pretrained(folder / "base", **load).eval()
    new = tlr.get_lotr_model(fresh, tlr.LoTRConfig(**CONFIG))
    assert new.lotr_factors["query"].out_factor.device == fresh.bert.pooler.dense.weight.device
    torch.testing.assert_close(logits(new), logits(tiny_bert()), atol=0, rtol=0)


# --- what attaching refuses, before it allocates anything -----------------------------


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
