"""The inspect job (jobs/inspect.py): PEFT LoRA and LoTR folders described alike, ranks as pairs."""

from __future__ import annotations

import json

from builders import peft_variant

from tensorlotr.cli import main as cli
from tensorlotr.jobs.convert import convert_lora
from tensorlotr.jobs.inspect import inspect_adapter


def test_inspect_both_formats(tmp_path):
    peft_variant("bert", tmp_path / "peft")
    convert_lora(tmp_path / "peft", tmp_path / "lotr", rank=2)
    peft_info, lotr_info = inspect_adapter(tmp_path / "peft"), inspect_adapter(tmp_path / "lotr")
    assert peft_info["format"] == "peft-lora" and lotr_info["format"] == "lotr"
    assert [g["group"] for g in peft_info["groups"]] == [g["group"] for g in lotr_info["groups"]]
    assert peft_info["groups"][0]["dtype"] == "float32"
    assert all(g["rank"] == [2, 2] for g in lotr_info["groups"])


def test_inspect_json_gives_ranks_as_pairs_for_lora_and_lotr(tmp_path, capsys):
    peft_variant("llama", tmp_path / "peft")
    assert cli(["convert", str(tmp_path / "peft"), str(tmp_path / "lotr"), "--rank", "4,2"]) == 0
    capsys.readouterr()
    ranks = {}
    for name in ("peft", "lotr"):
        assert cli(["inspect", str(tmp_path / name), "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        ranks[name] = [g["rank"] for g in report["groups"]]
        assert report["totals"]["params"] == sum(g["params"] for g in report["groups"])
    assert all(isinstance(r, list) and len(r) == 2 for rs in ranks.values() for r in rs)
    assert ranks["lotr"] == [[4, 2]] * 3
