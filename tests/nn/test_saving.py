"""Saving and loading LoTRModel adapters: PEFT's folder layout, fresh, meta and device-mapped bases, dtypes, the Hub."""

from __future__ import annotations

import pytest
import torch
from builders import (
    MODELS,
    TARGETS,
    fake_hub_cache,
    inputs,
    logits,
    lotr_pair_model,
    meta_bert,
    peft_pair_model,
    tiny_bert,
    tiny_llama,
    train_steps,
    twin,
)
from peft import PeftModel
from transformers import AutoModelForSequenceClassification

import tensorlotr as tlr

CONFIG = dict(rank=4, target_modules=["query", "value"], modules_to_save=["classifier"])


# --- one adapter, on a fresh base ----------------------------------------------------------


@pytest.mark.parametrize("arch", list(MODELS))
def test_save_and_load_on_fresh_base(arch, tmp_path):
    model = MODELS[arch]()
    fresh = twin(model)
    config = tlr.LoTRConfig(rank=(3, 5), target_modules=TARGETS[arch], modules_to_save=None)
    lotr = tlr.get_lotr_model(model, config)
    train_steps(lotr)
    lotr.save_pretrained(tmp_path / "adapter")
    saved = sorted(p.name for p in (tmp_path / "adapter").iterdir())  # the adapter's two files and its model card
    assert saved == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    loaded = tlr.LoTRModel.from_pretrained(fresh, tmp_path / "adapter")
    batch = inputs(seed=4)
    with torch.no_grad():
        torch.testing.assert_close(logits(loaded, batch), logits(lotr, batch), atol=0, rtol=0)
    assert loaded.get_nb_trainable_parameters()[0] == 0
    trainable = tlr.LoTRModel.from_pretrained(MODELS[arch](), tmp_path / "adapter", is_trainable=True)
    assert trainable.get_nb_trainable_parameters()[0] == lotr.get_nb_trainable_parameters()[0]


def test_adapter_on_base_of_other_shapes(tmp_path):
    lotr = tlr.get_lotr_model(tiny_bert(), tlr.LoTRConfig(rank=2, target_modules=["query"]))
    lotr.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"expects module .*query' of shape 32x32.*model's is"):
        tlr.LoTRModel.from_pretrained(tiny_bert(hidden_size=48), tmp_path)
    with pytest.raises(ValueError, match="which the model lacks"):
        tlr.LoTRModel.from_pretrained(tiny_llama(), tmp_path)


def test_missing_and_corrupt_adapter_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"lotr_config\.json is missing"):
        tlr.LoTRModel.from_pretrained(tiny_bert(), tmp_path)
    lotr = tlr.get_lotr_model(tiny_bert(), tlr.LoTRConfig(rank=2, target_modules=["query"]))
    lotr.save_pretrained(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match="cannot be read as safetensors"):
        tlr.LoTRModel.from_pretrained(tiny_bert(), tmp_path)


# --- named adapters in PEFT's layout, and zoos --------------------------------------------------


def test_save_lays_adapters_out_as_peft_and_loads_them_back(peft_pair, tmp_path):
    lotr = lotr_pair_model(peft_pair)
    lotr.save_pretrained(tmp_path / "all")
    # the first adapter is not named "default": every adapter goes in its own subfolder, as PEFT does
    assert (tmp_path / "all" / "first" / "adapter_config.json").is_file()
    assert (tmp_path / "all" / "second" / "adapter_model.safetensors").is_file()
    lotr.save_pretrained(tmp_path / "one", selected_adapters=["second"])
    assert [p.name for p in (tmp_path / "one").iterdir()] == ["second"]
    again = tlr.LoTRModel.from_pretrained(tiny_llama(0), tmp_path / "all", subfolder="second", adapter_name="second")
    lotr.set_adapter("second")
    torch.testing.assert_close(logits(again, inputs(batch=4)), logits(lotr, inputs(batch=4)), atol=0, rtol=0)
    default = tlr.get_lotr_model(tiny_llama(0), tlr.LoTRConfig(rank=2, target_modules=["q_proj"]))
    default.add_adapter("other", tlr.LoTRConfig(rank=2, target_modules=["v_proj"]))
    default.save_pretrained(tmp_path / "mixed")
    assert (tmp_path / "mixed" / "adapter_config.json").is_file() and (tmp_path / "mixed" / "other").is_dir()


def test_from_pretrained_on_a_peft_folder_says_how_to_convert(peft_pair):
    with pytest.raises(ValueError, match=r"from_lora.*tensorlotr convert"):
        tlr.LoTRModel.from_pretrained(tiny_llama(0), peft_pair / "first")


def test_zoo_serves_every_adapter_with_factors_held_once(peft_pair, tmp_path):
    tlr.compress_zoo([peft_pair / "first", peft_pair / "second"], tmp_path / "zoo")
    zoo = tlr.LoTRModel.from_pretrained(tiny_llama(0), tmp_path / "zoo")
    assert sorted(zoo.lotr_configs) == ["first", "second"]
    assert all(key.startswith("zoo--") for key in zoo.lotr_factors)  # one set of factors per group, shared
    peft = peft_pair_model(peft_pair)
    for name in ("first", "second"):
        zoo.set_adapter(name)
        peft.set_adapter(name)
        torch.testing.assert_close(logits(zoo, inputs(batch=4)), logits(peft, inputs(batch=4)), atol=1e-5, rtol=0)
    names = ["second", "first", "first", "__base__"]
    batch = inputs(seed=9, batch=4)
    torch.testing.assert_close(
        logits(zoo, batch, adapter_names=names), logits(peft, batch, adapter_names=names), atol=1e-5, rtol=0
    )


# --- the Hub, offline ------------------------------------------------------------------------


def test_loading_by_repo_id_from_the_cache(peft_pair, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    fake_hub_cache(tmp_path / "hub", "someone/first-lotr", peft_pair / "first-lotr")
    fake_hub_cache(tmp_path / "hub", "someone/second-lotr", peft_pair / "second-lotr")
    lotr = tlr.LoTRModel.from_pretrained(tiny_llama(0), "someone/first-lotr", cache_dir=tmp_path / "hub")
    lotr.load_adapter("someone/second-lotr", adapter_name="second", cache_dir=tmp_path / "hub")
    lotr.set_adapter("second")
    peft = PeftModel.from_pretrained(tiny_llama(0), peft_pair / "second").eval()
    torch.testing.assert_close(logits(lotr, inputs(batch=4)), logits(peft, inputs(batch=4)), atol=1e-5, rtol=0)
    config = tlr.LoTRConfig.from_pretrained("someone/first-lotr", cache_dir=tmp_path / "hub")
    assert sorted(config.target_modules) == ["q_proj", "v_proj"]
    with pytest.raises(FileNotFoundError, match=r"'someone/absent'.*not in the cache"):
        tlr.LoTRModel.from_pretrained(tiny_llama(0), "someone/absent", cache_dir=tmp_path / "hub")


def test_push_uploads_the_adapter_only(peft_pair, tmp_path, monkeypatch):
    from huggingface_hub import HfApi

    uploads = []
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: uploads.append(("create", repo_id)))

    def upload_folder(self, *, repo_id, folder_path, **kw):
        files = sorted(str(p.relative_to(folder_path)) for p in __import__("pathlib").Path(folder_path).rglob("*"))
        uploads.append(("upload", repo_id, files))

    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    lotr = lotr_pair_model(peft_pair)
    lotr.push_to_hub("me/adapters")
    assert uploads[0] == ("create", "me/adapters")
    assert uploads[1] == (
        "upload",
        "me/adapters",
        [
            "first",
            "first/README.md",
            "first/adapter_config.json",
            "first/adapter_model.safetensors",
            "second",
            "second/README.md",
            "second/adapter_config.json",
            "second/adapter_model.safetensors",
        ],
    )
    lotr.save_pretrained(tmp_path / "saved", push_to_hub=True, repo_id="me/saved", selected_adapters=["first"])
    assert uploads[-1][:2] == ("upload", "me/saved") and "first/adapter_model.safetensors" in uploads[-1][2]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConnectionError, match="me/adapters"):
        lotr.push_to_hub("me/adapters")


# --- devices and dtypes: .to(), meta-device bases, device_map and low_cpu_mem_usage loading --------


def randomise(lotr: tlr.LoTRModel, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in lotr.parameters():
            if param.requires_grad:
                param.add_(0.3 * torch.randn(param.shape, generator=generator))


def adapter_tensors(lotr: tlr.LoTRModel) -> dict[str, torch.Tensor]:
    return lotr.adapter_files().tensors


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
