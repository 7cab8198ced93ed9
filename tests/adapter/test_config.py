"""LoTRConfig and its config file (adapter/config.py): values checked, JSON round trips, unknown keys kept."""

from __future__ import annotations

import json

import pytest

import tensorlotr as tlr


def test_config_json_round_trip(tmp_path):
    config = tlr.LoTRConfig(rank=(4, 2), alpha=3.0, target_modules=["q"], groups={"g": ["q"]}, rank_pattern={"g": 5})
    data = json.loads(json.dumps(config.to_dict()))
    assert tlr.LoTRConfig.from_dict(data) == config


def test_bad_config_values():
    with pytest.raises(ValueError, match="init must be"):
        tlr.LoTRConfig(init="xavier")
    with pytest.raises(ValueError, match="rank must be positive"):
        tlr.LoTRConfig(rank=0)
    with pytest.raises(ValueError, match="groups must be"):
        tlr.LoTRConfig(groups="everything")
    with pytest.raises(ValueError, match="unknown LoTRConfig fields"):
        tlr.LoTRConfig.from_dict({"rank": 2, "r": 3})


def test_task_type_and_layers_pattern_are_checked():
    with pytest.raises(ValueError, match="task_type must be one of"):
        tlr.LoTRConfig(task_type="CLASSIFY")
    with pytest.raises(ValueError, match="layers_pattern needs layers_to_transform"):
        tlr.LoTRConfig(layers_pattern="layers")


@pytest.mark.parametrize(
    "options",
    [{"alpha": float("nan")}, {"alpha": float("inf")}, {"alpha_pattern": {"q_proj": float("nan")}}, {"dropout": 1e999}],
)
def test_lotr_config_refuses_non_finite_values(options):
    with pytest.raises(ValueError, match=r"must be a positive finite number|dropout must be in \[0, 1\)"):
        tlr.LoTRConfig(**options)


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
