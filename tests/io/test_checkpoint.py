"""Model checkpoints (io/checkpoint.py): shards stay inside the model folder; bad JSON names the file."""

from __future__ import annotations

import json

import pytest
from builders import error_line, run

from tensorlotr.cli import main as cli


@pytest.mark.parametrize("shard", ["../../etc/passwd", "/etc/passwd", "sub/../../x.safetensors"])
def test_shard_files_must_stay_inside_the_model_folder(shard, pair, capsys):
    index = pair / "ft" / "model.safetensors.index.json"
    document = json.loads(index.read_text())
    document["weight_map"][next(iter(document["weight_map"]))] = shard
    index.write_text(json.dumps(document))
    args = ["decompose", str(pair / "base"), str(pair / "ft"), str(pair / "o"), "--target-modules", "q_proj"]
    assert cli(args) == 2
    line = error_line(capsys.readouterr().err, "decompose")
    assert f"shard {shard!r} lies outside the model folder" in line and str(index) in line
    assert not (pair / "o").exists()


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("config.json", "[1]", "config.json holds an array, not a JSON object"),
        ("config.json", "{", "config.json is not valid JSON"),
        ("model.safetensors.index.json", '{"weight_map": [1]}', "model.safetensors.index.json is not a safetensors"),
    ],
)
def test_bad_model_folder_json_names_the_file(name, text, message, pair, capsys):
    (pair / "ft" / name).write_text(text)
    args = ["decompose", str(pair / "base"), str(pair / "ft"), str(pair / "o"), "--target-modules", "q_proj"]
    assert run(args) == 2
    assert f"{pair / 'ft'}/{message}" in error_line(capsys.readouterr().err, "decompose")
