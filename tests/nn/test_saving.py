"""Named adapters, mixed-adapter batches, the Hub and the model card, checked against PEFT on tiny models."""

from __future__ import annotations

import shutil

import pytest
import torch
from models import inputs, tiny_bert, tiny_llama
from peft import LoraConfig, PeftModel, get_peft_model

import tensorlotr as tlr
from tensorlotr.convert import convert_lora

LORAS = {
    "first": dict(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8),
    "second": dict(target_modules=["q_proj", "o_proj"], r=2, lora_alpha=3),
}


def logits(model, batch=None, **kwargs):
    with torch.no_grad():
        return model(**(batch or inputs(batch=4)), **kwargs).logits


@pytest.fixture(scope="module")
def peft_pair(tmp_path_factory):
    """Two PEFT LoRAs of one tiny Llama, each saved, and each converted exactly to LoTR."""
    root = tmp_path_factory.mktemp("pair")
    for seed, (name, kwargs) in enumerate(LORAS.items()):
        torch.manual_seed(seed + 10)
        get_peft_model(tiny_llama(0), LoraConfig(init_lora_weights=False, **kwargs)).save_pretrained(root / name)
        convert_lora(root / name, root / f"{name}-lotr")
    return root


def peft_model(root):
    model = PeftModel.from_pretrained(tiny_llama(0), root / "first", adapter_name="first")
    model.load_adapter(root / "second", adapter_name="second")
    return model.eval()


def lotr_model(root):
    model = tlr.LoTRModel.from_pretrained(tiny_llama(0), root / "first-lotr", adapter_name="first")
    model.load_adapter(root / "second-lotr", adapter_name="second")
    return model


def test_named_adapters_switch_as_in_peft(peft_pair):
    peft, lotr = peft_model(peft_pair), lotr_model(peft_pair)
    assert lotr.active_adapter == "first" and lotr.active_adapters == ["first"]
    torch.testing.assert_close(logits(lotr), logits(peft), atol=1e-5, rtol=0)
    peft.set_adapter("second")
    lotr.set_adapter("second")
    assert lotr.active_adapter == "second"
    torch.testing.assert_close(logits(lotr), logits(peft), atol=1e-5, rtol=0)
    with peft.disable_adapter(), lotr.disable_adapter():
        torch.testing.assert_close(logits(lotr), logits(peft), atol=1e-6, rtol=0)
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


def test_save_lays_adapters_out_as_peft_and_loads_them_back(peft_pair, tmp_path):
    lotr = lotr_model(peft_pair)
    lotr.save_pretrained(tmp_path / "all")
    # the first adapter is not named "default": every adapter goes in its own subfolder, as PEFT does
    assert (tmp_path / "all" / "first" / "lotr_config.json").is_file()
    assert (tmp_path / "all" / "second" / "lotr_model.safetensors").is_file()
    lotr.save_pretrained(tmp_path / "one", selected_adapters=["second"])
    assert [p.name for p in (tmp_path / "one").iterdir()] == ["second"]
    again = tlr.LoTRModel.from_pretrained(tiny_llama(0), tmp_path / "all", subfolder="second", adapter_name="second")
    lotr.set_adapter("second")
    torch.testing.assert_close(logits(again), logits(lotr), atol=0, rtol=0)
    default = tlr.get_lotr_model(tiny_llama(0), tlr.LoTRConfig(rank=2, target_modules=["q_proj"]))
    default.add_adapter("other", tlr.LoTRConfig(rank=2, target_modules=["v_proj"]))
    default.save_pretrained(tmp_path / "mixed")
    assert (tmp_path / "mixed" / "lotr_config.json").is_file() and (tmp_path / "mixed" / "other").is_dir()


def test_mixed_batch_equals_each_sample_alone_and_peft(peft_pair):
    peft, lotr = peft_model(peft_pair), lotr_model(peft_pair)
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
    lotr = lotr_model(peft_pair)
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
    lotr = lotr_model(peft_pair)
    lotr.set_adapter(["first", "second"])  # active updates add up
    both = logits(lotr)
    lotr.merge_adapter()
    torch.testing.assert_close(logits(lotr), both, atol=1e-5, rtol=0)
    lotr.unmerge_adapter()
    lotr.set_adapter("first")
    torch.testing.assert_close(logits(lotr), logits(lotr_model(peft_pair)), atol=1e-6, rtol=0)


# --- loading from LoRA -----------------------------------------------------------------------


def test_from_lora_converts_in_memory(peft_pair):
    lotr = tlr.LoTRModel.from_lora(tiny_llama(0), peft_pair / "first")
    peft = PeftModel.from_pretrained(tiny_llama(0), peft_pair / "first").eval()
    torch.testing.assert_close(logits(lotr), logits(peft), atol=1e-5, rtol=0)
    assert lotr.conversion_report.relative_error < 1e-5
    small = tlr.LoTRModel.from_lora(tiny_llama(0), peft_pair / "first", rank=2)
    assert all(g.rank == (2, 2) for g in small.groups.values())


def test_from_pretrained_on_a_peft_folder_says_how_to_convert(peft_pair):
    with pytest.raises(ValueError, match=r"from_lora.*tensorlotr convert"):
        tlr.LoTRModel.from_pretrained(tiny_llama(0), peft_pair / "first")


# --- the Hub, offline ------------------------------------------------------------------------


def _cache(cache, repo_id, folder, commit="a" * 40):
    """huggingface_hub's documented cache layout: models--org--name/{refs/main, snapshots/<commit>/...}."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)


def test_loading_by_repo_id_from_the_cache(peft_pair, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _cache(tmp_path / "hub", "someone/first-lotr", peft_pair / "first-lotr")
    _cache(tmp_path / "hub", "someone/second-lotr", peft_pair / "second-lotr")
    lotr = tlr.LoTRModel.from_pretrained(tiny_llama(0), "someone/first-lotr", cache_dir=tmp_path / "hub")
    lotr.load_adapter("someone/second-lotr", adapter_name="second", cache_dir=tmp_path / "hub")
    lotr.set_adapter("second")
    peft = PeftModel.from_pretrained(tiny_llama(0), peft_pair / "second").eval()
    torch.testing.assert_close(logits(lotr), logits(peft), atol=1e-5, rtol=0)
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
    lotr = lotr_model(peft_pair)
    lotr.push_to_hub("me/adapters")
    assert uploads[0] == ("create", "me/adapters")
    assert uploads[1] == (
        "upload",
        "me/adapters",
        [
            "first",
            "first/README.md",
            "first/lotr_config.json",
            "first/lotr_model.safetensors",
            "second",
            "second/README.md",
            "second/lotr_config.json",
            "second/lotr_model.safetensors",
        ],
    )
    lotr.save_pretrained(tmp_path / "saved", push_to_hub=True, repo_id="me/saved", selected_adapters=["first"])
    assert uploads[-1][:2] == ("upload", "me/saved") and "first/lotr_model.safetensors" in uploads[-1][2]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConnectionError, match="me/adapters"):
        lotr.push_to_hub("me/adapters")


def test_model_card_is_written_and_user_edits_survive(tmp_path):
    lotr = tlr.get_lotr_model(tiny_bert(0), tlr.LoTRConfig(rank=2, target_modules=["query", "value"]))
    lotr.save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: tensorlotr" in card and "| query |" in card
    (tmp_path / "README.md").write_text(card + "\nMy notes.\n")
    lotr.save_pretrained(tmp_path)
    assert "My notes." in (tmp_path / "README.md").read_text()


# --- a zoo served as named adapters ----------------------------------------------------------


def test_zoo_serves_every_adapter_with_factors_held_once(peft_pair, tmp_path):
    tlr.compress_zoo([peft_pair / "first", peft_pair / "second"], tmp_path / "zoo")
    zoo = tlr.LoTRModel.from_pretrained(tiny_llama(0), tmp_path / "zoo")
    assert sorted(zoo.lotr_configs) == ["first", "second"]
    assert all(key.startswith("zoo--") for key in zoo.lotr_factors)  # one set of factors per group, shared
    peft = peft_model(peft_pair)
    for name in ("first", "second"):
        zoo.set_adapter(name)
        peft.set_adapter(name)
        torch.testing.assert_close(logits(zoo), logits(peft), atol=1e-5, rtol=0)
    names = ["second", "first", "first", "__base__"]
    batch = inputs(seed=9, batch=4)
    torch.testing.assert_close(
        logits(zoo, batch, adapter_names=names), logits(peft, batch, adapter_names=names), atol=1e-5, rtol=0
    )
