"""LoTR adapter folders (io/lotr_format.py): malformed lotr_config.json files are named in one-line errors."""

from __future__ import annotations

import json

import pytest
from builders import error_line

from tensorlotr.cli import main as cli
from tensorlotr.jobs.convert import convert_lora


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.pop("groups"), "'groups' must be a non-empty object"),
        (lambda d: d.update(groups=[]), "'groups' must be a non-empty object"),
        (lambda d: d["groups"]["q_proj"].update(scale="x"), "'scale' must be a finite number"),
        (lambda d: d["groups"]["q_proj"].update(rank=[0, 2]), "'rank' must be two positive integers"),
        (lambda d: d["groups"]["q_proj"].pop("modules"), "'modules' must be a non-empty list"),
        (lambda d: d.update(config=[1]), "'config' must be an object"),
        (lambda d: d.update(format_version="1"), "format version"),
    ],
)
def test_malformed_lotr_configs_are_clear_errors(edit, message, lora, tmp_path, capsys):
    convert_lora(lora, tmp_path / "lotr")
    config = tmp_path / "lotr" / "lotr_config.json"
    document = json.loads(config.read_text())
    edit(document)
    config.write_text(json.dumps(document))
    for command in (["inspect", str(tmp_path / "lotr")], ["export-lora", str(tmp_path / "lotr"), str(tmp_path / "o")]):
        assert cli(command) == 2
        line = error_line(capsys.readouterr().err, command[0])
        assert str(config) in line and message in line
    assert not (tmp_path / "o").exists()
