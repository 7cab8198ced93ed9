"""Output-aware compression in the jobs (jobs/calibration.py): its settings; calibrated convert, zoo, decompose, CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from builders import BERT_LORA, bert_loras, peft_lora, tiny_bert, token_batches

from tensorlotr.io import read_adapter
from tensorlotr.io.peft_lora import PeftLoRA
from tensorlotr.jobs.calibration import Calibration, error_sums
from tensorlotr.jobs.convert import convert_lora
from tensorlotr.jobs.inspect import inspect_adapter
from tensorlotr.nn.calibration import calibrate

# --- calibrated conversion -------------------------------------------------------------------


def test_calibrated_conversion_lowers_the_output_error_and_full_rank_stays_exact(tmp_path):
    base = tiny_bert(0)
    peft_lora(tmp_path / "peft", tiny_bert(0), **BERT_LORA)
    data = token_batches(8, padded=True)
    plain = convert_lora(tmp_path / "peft", tmp_path / "plain", rank=2)
    modules = [f"bert.encoder.layer.{i}.attention.self.{p}" for i in range(3) for p in ("query", "value")]
    stats = calibrate(base, data, modules)
    calibrated = convert_lora(tmp_path / "peft", tmp_path / "calibrated", rank=2, calibration=stats)
    # the plain adapter's output error, measured with the same statistics
    lora, files = PeftLoRA(tmp_path / "peft"), read_adapter(tmp_path / "plain")
    for row in calibrated.groups:
        names = files.groups[row.group].modules
        plain_sums = error_sums(files.tucker(row.group), *lora.load(names), stats.factors(names))
        assert row.output_error < plain_sums.output_error - 0.01
    assert calibrated.output_error < 1 and plain.output_error is None
    assert (tmp_path / "calibrated" / "compression_report.json").is_file()
    assert not (tmp_path / "plain" / "compression_report.json").exists()
    shown = inspect_adapter(tmp_path / "calibrated")["groups"]
    assert [g["output_error"] for g in shown] == pytest.approx([g.output_error for g in calibrated.groups])
    assert "output_error" not in inspect_adapter(tmp_path / "plain")["groups"][0]
    exact = convert_lora(tmp_path / "peft", None, calibration=Calibration(inputs=data, base_model=base))
    assert exact.relative_error < 1e-6 and exact.output_error < 1e-6
    weight_objective = convert_lora(
        tmp_path / "peft", None, rank=2, calibration=Calibration(stats=stats, objective="weight")
    )
    assert weight_objective.relative_error == pytest.approx(plain.relative_error, rel=1e-6)
    assert weight_objective.output_error > calibrated.output_error


def test_convert_with_heal_reports_errors_before_and_after(bert_lora, tmp_path):
    folder, _ = bert_lora
    calibration = Calibration(
        inputs=token_batches(8, 0, length=10), base_model=tiny_bert(0), heal_steps=40, heal_lr=1e-2
    )
    report = convert_lora(folder / "peft", tmp_path / "out", rank=2, calibration=calibration)
    assert report.heal is not None and report.heal["error_after"] < report.heal["error_before"]
    for row in report.groups:
        assert None not in (row.output_error, row.healed_error, row.healed_output_error)
    assert "heal: 40 steps" in report.text()
    with pytest.raises(ValueError, match="needs the calibration inputs"):
        Calibration(stats=calibration.stats, heal_steps=5)


# --- the calibrated zoo ----------------------------------------------------------------------


def test_calibrated_zoo_with_heal_reports_output_errors_and_inspect_shows_them(tmp_path):
    from tensorlotr.jobs.zoo import compress_zoo

    folders = bert_loras(tmp_path, big=2.0)
    calibration = Calibration(
        inputs=token_batches(8, padded=True), base_model=tiny_bert(0), heal_steps=20, heal_lr=1e-2
    )
    report = compress_zoo(folders, tmp_path / "zoo", rank=3, calibration=calibration)
    for entry in report.adapters:
        assert entry.output_error is not None and entry.healed_output_error is not None
        assert entry.heal is not None and entry.heal["error_after"] < entry.heal["error_before"]
    assert {(r["adapter"], r["group"]) for r in report.adapter_groups} == {
        (a, g) for a in ("big", "small") for g in ("query", "value")
    }
    shown = inspect_adapter(tmp_path / "zoo")
    assert [a["output_error"] for a in shown["adapters"]] == pytest.approx([a.output_error for a in report.adapters])
    assert "output error" in shown.text() and "output error" in report.text()
    exact = compress_zoo(
        folders, None, calibration=Calibration(inputs=token_batches(4, padded=True), base_model=tiny_bert(0))
    )
    assert all(a.relative_error < 1e-6 and a.output_error < 1e-6 for a in exact.adapters)


# --- the command line -------------------------------------------------------------------------


def _model_folder(folder):
    """The tiny BERT saved with a word-level tokenizer of its 64-token vocabulary."""
    from transformers import BertTokenizer

    folder.mkdir()
    words = [f"w{i}" for i in range(59)]
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    BertTokenizer(str(folder / "vocab.txt")).save_pretrained(folder)
    tiny_bert(0).save_pretrained(folder)
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(words, size=rng.integers(3, 12))) for _ in range(40)]
    return texts


def test_cli_calibrated_convert_and_zoo(tmp_path, capsys):
    import json

    from tensorlotr.cli import main as cli

    texts = _model_folder(tmp_path / "model")
    (tmp_path / "texts.txt").write_text("\n".join(texts) + "\n")
    (tmp_path / "texts.tsv").write_text("sentence\tlabel\n" + "".join(f"{t}\t0\n" for t in texts))
    peft_lora(tmp_path / "peft", tiny_bert(0), **BERT_LORA)
    flags = ["--base-model", str(tmp_path / "model"), "--calibration-samples", "24"]
    argv = ["convert", str(tmp_path / "peft"), str(tmp_path / "out"), "--rank", "2", "--json"]
    assert cli([*argv, *flags, "--calibration-data", str(tmp_path / "texts.txt"), "--heal-steps", "5"]) == 0
    report = json.loads(capsys.readouterr().out)
    # 24 texts in batches of 16: the last batch (8 texts) is held out of the statistics and the heal
    assert report["calibration"]["samples"] == 16 and report["heal"]["steps"] == 5
    assert report["retention"]["samples"] == 8
    assert all(g["output_error"] is not None for g in report["groups"])
    folders = bert_loras(tmp_path)
    argv = ["zoo", "compress", *map(str, folders), str(tmp_path / "zoo"), "--rank", "2", "--min-retention", "0.5"]
    assert cli([*argv, *flags, "--calibration-data", str(tmp_path / "texts.tsv"), "--json"]) == 0
    zoo = json.loads(capsys.readouterr().out)
    assert all(a["retention"][a["retention"]["figure"]] >= 0.5 for a in zoo["adapters"])
    argv = ["zoo", "compress", *map(str, folders), str(tmp_path / "zoo2"), "--rank", "2", *flags, "--json",
            "--calibration-data", str(tmp_path / "texts.tsv"), "--eval-data", str(tmp_path / "texts.tsv")]  # fmt: skip
    assert cli(argv) == 0  # held-out texts given: the calibration keeps all of its own
    zoo = json.loads(capsys.readouterr().out)
    assert zoo["calibration"]["samples"] == 24 and zoo["adapters"][0]["retention"]["samples"] == len(texts)
    bad = {
        "--heal-steps needs --calibration-data": ["convert", "peft", "x", "--heal-steps", "5"],
        "needs --base-model": ["convert", "peft", "x", "--calibration-data", "t.txt"],
        "expected a number in (0, 1]": ["zoo", "compress", "a", "z", "--min-retention", "1.5"],
    }
    for message, args in bad.items():
        with pytest.raises(SystemExit) as exit_info:
            cli(args)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


# --- calibrated decompose ---------------------------------------------------------------------


def test_calibrated_decompose_lowers_the_output_error_with_an_exact_weight_error(tmp_path):
    from tensorlotr.jobs.decompose import decompose

    base, finetuned = tiny_bert(0), tiny_bert(0)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in finetuned.bert.encoder.layer:
            for module in (layer.attention.self.query, layer.attention.self.value):
                module.weight += torch.randn(32, 6, generator=generator) @ torch.randn(6, 32, generator=generator) / 8
    targets = ["query", "value"]
    decompose(base, finetuned, tmp_path / "plain", target_modules=targets, rank=2)
    calibration = Calibration(inputs=token_batches(8, padded=True), base_model=tiny_bert(0))
    result = decompose(base, finetuned, None, target_modules=targets, rank=2, calibration=calibration)
    files, report = result.adapter, result.report
    stats = calibration.stats
    assert stats is not None
    plain_files = read_adapter(tmp_path / "plain")
    for row in report.groups:
        modules = files.groups[row.group].modules
        deltas = [(finetuned.get_submodule(m).weight - base.get_submodule(m).weight).detach().double() for m in modules]
        eye = torch.eye(32, dtype=torch.float64)
        factors = stats.factors(modules)
        ours = error_sums(files.tucker(row.group), deltas, [eye] * 3, [1.0] * 3, factors)
        theirs = error_sums(plain_files.tucker(row.group), deltas, [eye] * 3, [1.0] * 3, factors)
        assert ours.output_error < theirs.output_error - 0.02
        assert row.relative_error == pytest.approx(ours.weight_error, abs=1e-5)  # exact, from the extra pass
        assert row.route.endswith("+calibrated") and row.output_error is not None
    with pytest.raises(ValueError, match="needs a rank"):
        decompose(base, finetuned, None, target_modules=targets, calibration=calibration)
