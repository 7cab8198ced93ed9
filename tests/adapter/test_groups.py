"""Grouping rules (adapter/groups.py): layer indices, module selection, explicit groups, one shape per group."""

from __future__ import annotations

import pytest
from builders import tiny_llama

import tensorlotr as tlr
from tensorlotr.adapter.groups import layer_index, select_modules


def test_layer_index_with_a_layers_pattern():
    assert layer_index("model.layers.3.mlp.up_proj") == 3
    assert layer_index("transformer.h.7.attn.c_attn", "h") == 7
    assert layer_index("blocks.2.sub.5.q", ["sub"]) == 5
    assert layer_index("model.layers.3.q", "h") is None
    assert select_modules(["a.0.q", "a.1.q", "a.1.k"], ["q"], layers_to_transform=[1]) == ["a.1.q"]


def test_explicit_groups():
    model = tiny_llama()
    groups = {"attn": ["q_proj", "o_proj"], "mlp_in": ["gate_proj", "up_proj"]}
    lotr = tlr.get_lotr_model(model, tlr.LoTRConfig(rank=2, groups=groups))
    assert set(lotr.groups) == {"attn", "mlp_in"}
    assert len(lotr.groups["attn"].modules) == 6


def test_group_with_mixed_shapes_names_modules():
    config = tlr.LoTRConfig(rank=2, groups={"mixed": ["q_proj", "down_proj"]})
    with pytest.raises(ValueError, match=r"group 'mixed' mixes weight shapes.*q_proj 32x32.*down_proj 32x40"):
        tlr.get_lotr_model(tiny_llama(), config)
