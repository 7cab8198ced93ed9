"""PEFT's config conventions, config save/load, Hub loading from a local cache, and the model card."""

from __future__ import annotations

import json
import shutil

import pytest
from models import tiny_bert, tiny_llama
from peft import LoraConfig, get_peft_model

import tensorlotr as tlr
from tensorlotr.adapter.groups import layer_index, select_modules
from tensorlotr.io.hub import push_folder, resolve_folder
from tensorlotr.io.model_card import write_model_card

# --- target selection --------------------------------------------------------------------


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


def test_layer_index_with_a_layers_pattern():
    assert layer_index("model.layers.3.mlp.up_proj") == 3
    assert layer_index("transformer.h.7.attn.c_attn", "h") == 7
    assert layer_index("blocks.2.sub.5.q", ["sub"]) == 5
    assert layer_index("model.layers.3.q", "h") is None
    assert select_modules(["a.0.q", "a.1.q", "a.1.k"], ["q"], layers_to_transform=[1]) == ["a.1.q"]


# --- rank_pattern and alpha_pattern keyed as PEFT keys them -----------------------------------


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


def test_task_type_and_layers_pattern_are_checked():
    with pytest.raises(ValueError, match="task_type must be one of"):
        tlr.LoTRConfig(task_type="CLASSIFY")
    with pytest.raises(ValueError, match="layers_pattern needs layers_to_transform"):
        tlr.LoTRConfig(layers_pattern="layers")


# --- config files, unknown keys ---------------------------------------------------------------


def test_config_save_and_load_keeps_unknown_keys(tmp_path):
    config = tlr.LoTRConfig(rank=(4, 2), target_modules="all-linear", task_type="CAUSAL_LM", inference_mode=True)
    config.save_pretrained(tmp_path / "cfg")
    assert tlr.LoTRConfig.from_pretrained(tmp_path / "cfg") == config
    document = json.loads((tmp_path / "cfg" / "lotr_config.json").read_text())
    document["config"]["future_field"] = {"x": 1}
    (tmp_path / "cfg" / "lotr_config.json").write_text(json.dumps(document))
    with pytest.warns(UserWarning, match="future_field"):
        loaded = tlr.LoTRConfig.from_pretrained(tmp_path / "cfg")
    assert loaded.extra == {"future_field": {"x": 1}}
    assert loaded.to_dict()["future_field"] == {"x": 1}  # saved again, not dropped
    with pytest.raises(ValueError, match="unknown LoTRConfig fields"):
        tlr.LoTRConfig.from_dict(loaded.to_dict())  # explicit from_dict stays strict


# --- the Hub, offline, from a cache laid out as huggingface_hub lays it out ---------------------


def _fake_hub_cache(cache, repo_id, folder, revision="main", commit="0" * 40):
    """The documented cache layout: models--{org}--{name}/{refs/<rev>, snapshots/<commit>/files}."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    shutil.copytree(folder, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / revision).write_text(commit)
    (repo / "blobs").mkdir()
    return snapshot


def test_resolve_folder_reads_a_hub_cache_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "lotr_config.json").write_text("{}")
    snapshot = _fake_hub_cache(tmp_path / "cache", "someone/adapter", tmp_path / "src")
    assert resolve_folder("someone/adapter", cache_dir=tmp_path / "cache") == snapshot
    with pytest.raises(FileNotFoundError, match=r"'someone/other'.*not in the cache"):
        resolve_folder("someone/other", cache_dir=tmp_path / "cache")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_folder(tmp_path / "missing" / "dir")


def test_push_is_refused_offline_with_the_repo_named(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConnectionError, match="someone/adapter"):
        push_folder(tmp_path, "someone/adapter")


# --- the model card --------------------------------------------------------------------------


def test_model_card_front_matter_and_user_edits_survive(tmp_path):
    lotr = tlr.get_lotr_model(tiny_llama(0), tlr.LoTRConfig(rank=2, target_modules=["q_proj", "v_proj"]))
    files = lotr.adapter_files()
    files.base_model["name_or_path"] = "meta-llama/Llama-2-7b-hf"
    card = write_model_card(tmp_path, files)
    text = card.read_text()
    assert text.startswith("---\n") and "library_name: tensorlotr" in text
    assert "base_model: meta-llama/Llama-2-7b-hf" in text and "| q_proj |" in text
    card.write_text(text.replace("# LoTR adapter", "# My adapter\n\nTrained on my data.") + "\nlicense note\n")
    write_model_card(tmp_path, files)
    again = card.read_text()
    assert "Trained on my data." in again and "license note" in again and again.count("library_name") == 1
