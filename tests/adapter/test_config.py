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


@pytest.mark.parametrize("targets", [5, [5], ["q", 5], [""], 3.5, {"q": 1}])
def test_target_modules_of_the_wrong_type_are_refused_at_once(targets):
    """Issue 23, item 11: ``LoTRConfig(target_modules=5)`` was accepted and failed later."""
    with pytest.raises(ValueError, match="target_modules"):
        tlr.LoTRConfig(rank=4, target_modules=targets)


def test_the_docs_say_what_init_normal_draws():
    """Issue 23, item 17: std 1/sqrt(d) per factor (d_out for U, d_in for V); the original code's std 1 is not ours."""
    import math
    import re

    import torch
    from builders import REPO

    from tensorlotr.nn.layer import LoTRFactors

    torch.manual_seed(0)
    factors = LoTRFactors(400, 900, (50, 40))
    factors.reset_normal()
    for factor, d in ((factors.out_factor, 400), (factors.in_factor, 900)):
        assert float(factor.std()) == pytest.approx(1 / math.sqrt(d), rel=0.03)
    text = " ".join((REPO / "docs" / "training.md").read_text().split())
    row = re.search(r'`"normal"`: ([^;|]*)', text)
    assert row is not None, "docs/training.md does not describe init='normal'"
    assert "std 1/sqrt(d)" in row.group(1) and "as the original code" not in row.group(1), row.group(1)
    assert "the original code draws std 1" in text
    docstring = " ".join((tlr.LoTRConfig.__doc__ or "").split())
    assert "std ``1/sqrt(d)``" in docstring and "the original code draws std 1" in docstring
