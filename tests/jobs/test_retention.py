"""Held-out retention (nn/evaluate.py, jobs/retention.py), min_retention, and the zoo's per-adapter residuals."""

from __future__ import annotations

import json

import pytest
import torch
from builders import BERT_LORA, error_line, peft_lora, run, tiny_bert, token_batches

from tensorlotr.io.zoo_format import read_zoo
from tensorlotr.jobs.calibration import Calibration, Evaluation
from tensorlotr.jobs.convert import convert_lora
from tensorlotr.jobs.export import export_lora
from tensorlotr.jobs.zoo import compress_zoo
from tensorlotr.nn import LoTRModel


def _labels(batches: list[dict[str, torch.Tensor]], model: torch.nn.Module) -> list[int]:
    """Labels that the LoRA model gets right: its own predictions (its gain over the head-only model is real)."""
    with torch.no_grad():
        return [int(y) for b in batches for y in model(**b).logits.argmax(-1)]


@pytest.fixture
def classifier_lora(tmp_path):
    """A rank-4 LoRA on query/value/dense of the tiny BERT classifier, with its trained head."""
    config = {**BERT_LORA, "lora_alpha": 32, "target_modules": ["query", "value", "dense"]}
    peft_model = peft_lora(tmp_path / "lora", tiny_bert(0), seed=3, **config)
    return tmp_path / "lora", peft_model


def test_held_out_split_is_unseen_by_the_statistics_and_keeps_its_labels():
    batches = token_batches(8, 0, length=6)
    labels = list(range(32))  # 8 batches of 4
    cal = Calibration(inputs=batches, base_model=tiny_bert(0), labels=labels)
    assert cal.inputs is not None and len(cal.inputs) == 7  # the last eighth held out
    evaluation = cal.evaluation_for(None)
    assert evaluation is not None and len(evaluation.inputs) == 1
    assert torch.equal(evaluation.inputs[0]["input_ids"], batches[-1]["input_ids"])
    assert evaluation.labels == labels[28:] and cal.labels == labels[:28]
    stats = cal.statistics(["bert.encoder.layer.0.attention.self.query"])
    assert stats.modules["bert.encoder.layer.0.attention.self.query"].rows == 7 * 4 * 6


def test_convert_reports_held_out_retention_and_exact_conversion_keeps_everything(classifier_lora, tmp_path):
    folder, peft_model = classifier_lora
    held = token_batches(4, 99, length=8)
    cal = Calibration(inputs=token_batches(6, 0, length=8), base_model=tiny_bert(0),
                      evaluation=Evaluation(held, _labels(held, peft_model)), objective="weight")  # fmt: skip
    report = convert_lora(folder, tmp_path / "exact", calibration=cal)
    assert report.retention is not None
    assert report.retention["agreement"] == 1.0 and report.retention["output_retention"] > 0.9999
    assert report.retention["samples"] == 16 and report.retention["retained_gain"] == 1.0
    document = json.loads((tmp_path / "exact" / "compression_report.json").read_text())
    assert document["retention"]["agreement"] == 1.0
    low = convert_lora(folder, None, rank=1, calibration=cal)
    assert low.retention is not None and low.retention["output_retention"] < report.retention["output_retention"]


def test_min_retention_raises_the_convert_rank_until_the_held_out_figure_holds(classifier_lora):
    folder, peft_model = classifier_lora
    held = token_batches(8, 99, length=8)
    cal = Calibration(inputs=token_batches(6, 0, length=8), base_model=tiny_bert(0),
                      evaluation=Evaluation(held, _labels(held, peft_model)), objective="weight")  # fmt: skip
    report = convert_lora(folder, None, rank=1, calibration=cal, min_retention=0.9)
    assert report.retention is not None and report.retention["lower_bound"] >= 0.9
    assert report.retention_tries[0]["retained_gain"] < 0.5  # rank 1 keeps little of this LoRA's gain
    assert len(report.retention_tries) > 1
    assert report.retention_tries[0]["rank"][0] == [1, 1]
    assert all(t["lower_bound"] < 0.9 for t in report.retention_tries[:-1])
    assert any("min_retention 90%: rank raised from 1x1" in note for note in report.notes)
    # 32 held-out sentences cannot show 99%: even the lossless adapter's bound is lower, and the report says so
    strict = convert_lora(folder, None, rank=4, calibration=cal, min_retention=0.99)
    assert strict.retention is not None and strict.retention["retained_gain"] == 1.0
    assert strict.retention["lower_bound"] < 0.99
    assert any("too few held-out inputs to show it" in note for note in strict.notes)


def test_min_retention_needs_held_out_inputs(classifier_lora):
    folder, _ = classifier_lora
    with pytest.raises(ValueError, match="min_retention is held on held-out inputs"):
        convert_lora(folder, None, rank=1, min_retention=0.9)


def _zoo_loras(root, head: bool = False):
    """Three LoRAs of the tiny BERT (query/value/dense, rank 4) of different sizes; ``head``: a trained classifier."""
    folders, models = [], []
    for seed, alpha in ((1, 32.0), (2, 8.0), (3, 16.0)):
        config = {**BERT_LORA, "lora_alpha": alpha, "target_modules": ["query", "value", "dense"]}
        if not head:
            config = {k: v for k, v in config.items() if k not in ("modules_to_save", "task_type")}
        models.append(peft_lora(root / f"lora{seed}", tiny_bert(0), seed=seed, **config))
        folders.append(root / f"lora{seed}")
    return folders, models


def test_a_residual_is_stored_counted_served_in_mixed_batches_and_exported_exactly(tmp_path):
    folders, _ = _zoo_loras(tmp_path)
    plain = compress_zoo(folders, tmp_path / "plain", rank=2)
    report = compress_zoo(folders, tmp_path / "zoo", rank=2, residual_rank={"lora2": 3})
    rows = {a.adapter: a for a in report.adapters}
    plain_rows = {a.adapter: a for a in plain.adapters}
    assert rows["lora2"].residual is not None and rows["lora1"].residual is None
    assert rows["lora2"].relative_error < plain_rows["lora2"].relative_error
    assert rows["lora1"].relative_error == pytest.approx(plain_rows["lora1"].relative_error, rel=1e-6)
    # counted: the private factors (3 x (d_out + d_in)) and the larger cores
    assert report.stored_params > plain.stored_params
    assert rows["lora2"].core_params - plain_rows["lora2"].core_params == report.stored_params - plain.stored_params
    zoo = read_zoo(tmp_path / "zoo")
    assert json.loads((tmp_path / "zoo" / "zoo_config.json").read_text())["format_version"] == 2
    assert zoo.adapters["lora2"].residual == {g: (3, 3) for g in zoo.adapters["lora2"].groups}

    served = LoTRModel.from_pretrained(tiny_bert(0), tmp_path / "zoo")
    batch = token_batches(1, 5, length=7)[0]
    ids = torch.cat([batch["input_ids"][:2], batch["input_ids"][:1]])
    names = ["lora1", "lora2", "lora2"]
    mixed = served(input_ids=ids, adapter_names=names).logits
    for i, name in enumerate(names):
        alone = LoTRModel.from_adapter_files(tiny_bert(0), zoo.adapter(name))
        torch.testing.assert_close(mixed[i], alone(input_ids=ids[i : i + 1]).logits[0], atol=1e-5, rtol=0)

    from peft import PeftModel

    export_lora(tmp_path / "zoo", tmp_path / "lora2-export", adapter="lora2")
    peft_model = PeftModel.from_pretrained(tiny_bert(0), tmp_path / "lora2-export").eval()
    alone = LoTRModel.from_adapter_files(tiny_bert(0), zoo.adapter("lora2"))
    torch.testing.assert_close(peft_model(input_ids=ids).logits, alone(input_ids=ids).logits, atol=1e-5, rtol=0)


def test_an_older_reader_refuses_a_zoo_with_residuals_by_its_version(tmp_path):
    folders, _ = _zoo_loras(tmp_path)
    compress_zoo(folders[:2], tmp_path / "plain", rank=2)
    assert json.loads((tmp_path / "plain" / "zoo_config.json").read_text())["format_version"] == 1
    compress_zoo(folders[:2], tmp_path / "zoo", rank=2, residual_rank=2)
    config = json.loads((tmp_path / "zoo" / "zoo_config.json").read_text())
    config["adapters"]["lora1"]["residual"] = {"query": [2, "x"]}
    (tmp_path / "zoo" / "zoo_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"'residual' must map groups to ranks \[s_out, s_in\]"):
        read_zoo(tmp_path / "zoo")


def test_zoo_min_retention_gives_a_residual_to_the_adapters_that_fall_short(tmp_path):
    folders, _ = _zoo_loras(tmp_path, head=True)
    # no labels: the figure is the agreement with each LoRA, on 32 held-out sequences each
    held = {folder.name: Evaluation(token_batches(8, 40 + 10 * i, length=8)) for i, folder in enumerate(folders)}
    cal = Calibration(inputs=token_batches(6, 0, length=8), base_model=tiny_bert(0), evaluation=held,
                      objective="weight")  # fmt: skip
    plain = compress_zoo(folders, None, rank=1, calibration=cal, fairness="none")
    short = [a.adapter for a in plain.adapters if a.retention is not None and a.retention["lower_bound"] < 0.85]
    assert short, [a.retention for a in plain.adapters]
    report = compress_zoo(folders, None, rank=1, calibration=cal, min_retention=0.85, fairness="none")
    for row in report.adapters:
        assert row.retention is not None and row.retention["lower_bound"] >= 0.85, row.retention
    assert {a.adapter for a in report.adapters if a.residual} <= set(short)
    assert any("a private residual (" in note and "holds min_retention 85%" in note for note in report.notes)
    partial = Calibration(inputs=token_batches(6, 0, length=8), base_model=tiny_bert(0), objective="weight",
                          evaluation={folders[0].name: held[folders[0].name]})  # fmt: skip
    with pytest.raises(ValueError, match=r"adapters \['lora2', 'lora3'\] have none"):
        compress_zoo(folders, None, rank=1, calibration=partial, min_retention=0.85)


def test_residual_rank_is_checked(tmp_path):
    folders, _ = _zoo_loras(tmp_path)
    with pytest.raises(ValueError, match=r"residual_rank names adapters \['nope'\]"):
        compress_zoo(folders, None, rank=2, residual_rank={"nope": 2})
    with pytest.raises(ValueError, match="must be a whole number >= 0"):
        compress_zoo(folders, None, rank=2, residual_rank=-1)


def test_cli_eval_data_and_min_retention(tmp_path, capsys):
    from tensorlotr.jobs.demo import default_model_dir

    try:
        model = default_model_dir()
    except FileNotFoundError:
        pytest.skip("the packaged MiniLM is not installed")
    from peft import LoraConfig, get_peft_model

    from tensorlotr.jobs.calibration import load_base_model

    _, base = load_base_model(model, "SEQ_CLS", num_labels=2)
    torch.manual_seed(0)
    config = LoraConfig(r=2, target_modules=["query", "value"], init_lora_weights=False, modules_to_save=["classifier"],
                        task_type="SEQ_CLS")  # fmt: skip
    get_peft_model(base, config).save_pretrained(tmp_path / "lora")
    texts = ["a moving film", "a dull script", "the ending was superb", "not worth it"] * 4
    (tmp_path / "cal.txt").write_text("\n".join(texts) + "\n")
    (tmp_path / "held.tsv").write_text("sentence\tlabel\n" + "".join(f"{t}\t{i % 2}\n" for i, t in enumerate(texts)))
    args = ["convert", str(tmp_path / "lora"), str(tmp_path / "out"), "--rank", "1", "--base-model", str(model),
            "--calibration-data", str(tmp_path / "cal.txt"), "--eval-data", str(tmp_path / "held.tsv"),
            "--min-retention", "1", "--json"]  # fmt: skip
    assert run(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["retention"]["samples"] == 16 and report["retention"]["agreement"] == 1.0
    assert "accuracy_head" in report["retention"]
    assert run(["inspect", str(tmp_path / "out")]) == 0
    assert "held-out" in capsys.readouterr().out
    assert run(["convert", str(tmp_path / "lora"), str(tmp_path / "out2"), "--eval-data", "held.tsv"]) == 2
    line = error_line(capsys.readouterr().err, "convert")
    assert line == "tensorlotr convert: error: --eval-data needs --calibration-data FILE"


def test_zoo_add_gives_the_projected_adapter_a_residual_and_keeps_the_others(tmp_path):
    from tensorlotr.jobs.zoo import add_to_zoo

    folders, _ = _zoo_loras(tmp_path)
    compress_zoo(folders[:2], tmp_path / "zoo", rank=2, residual_rank={"lora1": 2})
    before = read_zoo(tmp_path / "zoo")
    projected = add_to_zoo(tmp_path / "zoo", folders[2], name="plain")
    with_residual = add_to_zoo(tmp_path / "zoo", folders[2], name="own", residual_rank=4)
    errors = {a.adapter: a.relative_error for a in with_residual.adapters}
    assert errors["own"] < {a.adapter: a.relative_error for a in projected.adapters}["plain"]
    zoo = read_zoo(tmp_path / "zoo")
    assert set(zoo.adapters["own"].residual) == set(zoo.adapters["own"].groups)
    assert zoo.adapters["lora1"].residual == before.adapters["lora1"].residual  # the others as they were
    for key, tensor in before.tensors.items():
        assert torch.equal(zoo.tensors[key], tensor), key
    with pytest.raises(ValueError, match="applies to a projection"):
        add_to_zoo(tmp_path / "zoo", folders[2], name="again", refit=True, residual_rank=2)
