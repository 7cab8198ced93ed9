"""``LoTRPeftConfig``: PEFT's config conventions, its file, and the conversion to and from ``tensorlotr.LoTRConfig``."""

from __future__ import annotations

import json

import pytest
from peft import PeftConfig, TaskType

from tensorlotr import LoTRConfig
from tensorlotr.peft import LOTR, LoTRPeftConfig


def test_fields_convert_to_and_from_lotr_config():
    config = LoTRPeftConfig(
        rank=(8, 4), alpha=16, target_modules=["q_proj", "v_proj"], exclude_modules=["layers.0.self_attn.v_proj"],
        layers_to_transform=[0, 1], layers_pattern="layers", groups={"attn": ["q_proj", "v_proj"]}, init="svd",
        dropout=0.1, modules_to_save=["lm_head"], rank_pattern={"attn": 2}, alpha_pattern={"attn": 4.0},
        adapter_dtype="float64", task_type=TaskType.CAUSAL_LM, inference_mode=True,
    )  # fmt: skip
    lotr = config.to_lotr_config()
    assert isinstance(lotr, LoTRConfig)
    assert lotr.rank_of("attn") == (2, 2) and lotr.scale_of("attn") == 2.0 and lotr.task_type == "CAUSAL_LM"
    assert (lotr.init, lotr.dropout, lotr.adapter_dtype, lotr.inference_mode) == ("svd", 0.1, "float64", True)
    back = LoTRPeftConfig.from_lotr_config(lotr)
    assert back.to_lotr_config() == lotr
    assert back.peft_type == LOTR == "LOTR"


def test_the_config_file_is_peft_s_and_loads_back(tmp_path):
    config = LoTRPeftConfig(rank=(16, 8), target_modules="all-linear", task_type="SEQ_CLS")
    config.save_pretrained(tmp_path)
    document = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (
        document["peft_type"] == "LOTR" and document["rank"] == [16, 8] and document["target_modules"] == "all-linear"
    )
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert type(loaded) is LoTRPeftConfig and loaded == config


def test_a_newer_config_loads_with_peft_s_warning(tmp_path):
    LoTRPeftConfig(rank=4, target_modules=["q_proj"]).save_pretrained(tmp_path)
    document = json.loads((tmp_path / "adapter_config.json").read_text())
    document["field_of_a_later_version"] = 1
    (tmp_path / "adapter_config.json").write_text(json.dumps(document))
    with pytest.warns(UserWarning, match=r"Unexpected keyword arguments \['field_of_a_later_version'\]"):
        assert PeftConfig.from_pretrained(tmp_path).rank == (4, 4)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rank": 0}, "rank must be positive"),
        ({"init": "kaiming"}, "init must be one of"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
        ({"groups": "all"}, "groups must be one of"),
        ({"layers_pattern": "layers"}, "layers_pattern needs layers_to_transform"),
        ({"rank_pattern": {"(": 2}}, "not a valid regular expression"),
        ({"task_type": "CLASSIFY"}, "Invalid task type"),
        ({"alpha": float("nan")}, "alpha must be a positive finite number"),
    ],
)
def test_bad_values_are_refused_when_the_config_is_made(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoTRPeftConfig(**kwargs)


def test_trainable_tokens_are_a_peft_only_feature():
    config = LoTRPeftConfig(target_modules=["q_proj"], trainable_token_indices=[5, 6])
    with pytest.raises(ValueError, match="trainable_token_indices is a PEFT feature that LoTRModel does not have"):
        config.to_lotr_config()
