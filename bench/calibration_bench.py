"""Output-aware compression on real adapters: weight-only, calibrated, and calibrated + heal.

    python bench/calibration_bench.py [--workdir DIR] [--stage train|convert|zoo|all]
        [--ranks 2,4,8] [--zoo-rank 16] [--zoo-modes weight,calibrated-fair,…]

1. Trains (once; cached in the workdir) PEFT LoRAs (r=8, alpha=16, query and value, the
   classifier head in ``modules_to_save``; batches of 16 sentences of at most 32 tokens,
   AdamW at 2e-3) on the packaged MiniLM: an SST-2 sentiment LoRA (200 steps), and four
   task LoRAs over SST-2 sentences for a zoo (120 steps each): sentiment, long sentence
   (more than 7 words), negation present, comma present.
2. Conversion: the SST-2 LoRA converted at Tucker ranks 2, 4 and 8: weight-only, calibrated,
   calibrated + heal and weight + heal (100 steps, cores and factors, Adam at 3e-3);
   accuracy on 1,000 SST-2 dev sentences and the share of the LoRA's gain over the head-only
   model (the LoRA's head without its weight updates) that is kept.
3. Zoo: the four task LoRAs in one zoo at ``--zoo-rank`` (16 stores 1/8 of their factors):
   the modes of ``ZOO_MODES`` (weight or calibrated objective, plain or fair, a retention
   guarantee, a heal of each adapter's cores: 100 steps, Adam at 1e-3); per adapter the share
   of its gain over the majority class kept, on the same dev sentences.

Calibration inputs are 256 SST-2 training sentences that no LoRA was trained on, tokenized
in batches of 16. One torch thread; wall and CPU seconds are recorded.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tensorlotr.jobs.data import read_tsv  # noqa: E402
from tensorlotr.jobs.demo import default_model_dir, load_classifier  # noqa: E402

SST2 = REPO.parent / "shared" / "data" / "sst2"
NEGATION = re.compile(r"\b(not|no|never|nothing|nobody|none|neither|nor|without|cannot)\b|n't")
#: Task name -> label of a sentence (the zoo's four tasks; "sentiment" uses SST-2's label).
TASKS = {
    "sentiment": None,
    "long": lambda s: int(len(s.split()) > 7),
    "negation": lambda s: int(NEGATION.search(s) is not None),
    "comma": lambda s: int("," in s),
}
MAX_LENGTH = 32
TRAIN_SIZE = 12000  # the first sentences of a fixed shuffle of SST-2 train; calibration comes after them


def sentences() -> tuple[list[tuple[str, int]], list[tuple[str, int]], list[str]]:
    """(train rows, 1,000 dev rows, 256 calibration sentences), fixed by seed 0."""
    train = read_tsv(SST2 / "train.tsv")
    random.Random(0).shuffle(train)
    dev = read_tsv(SST2 / "dev.tsv")
    random.Random(1).shuffle(dev)
    calibration = [s for s, _ in train[TRAIN_SIZE : TRAIN_SIZE + 256]]
    return train[:TRAIN_SIZE], dev[:1000], calibration


def relabel(rows: list[tuple[str, int]], task: str) -> list[tuple[str, int]]:
    label = TASKS[task]
    return rows if label is None else [(s, label(s)) for s, _ in rows]


def batches(tokenizer: Any, rows: list[tuple[str, int]], size: int):
    for start in range(0, len(rows), size):
        chunk = rows[start : start + size]
        enc = tokenizer(
            [s for s, _ in chunk], padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt"
        )
        yield enc, torch.tensor([y for _, y in chunk])


@torch.no_grad()
def accuracy(model: Any, tokenizer: Any, rows: list[tuple[str, int]]) -> float:
    model.eval()
    correct = sum(int((model(**enc).logits.argmax(-1) == y).sum()) for enc, y in batches(tokenizer, rows, 100))
    return correct / len(rows)


def train_lora(folder: Path, task: str, rows: list[tuple[str, int]], steps: int, seed: int) -> float:
    """Train a PEFT LoRA on ``task`` and save it to ``folder``; returns the seconds taken."""
    from peft import LoraConfig, get_peft_model

    start = time.perf_counter()
    tokenizer, model = load_classifier(default_model_dir(), seed=seed)
    config = LoraConfig(
        r=8, lora_alpha=16, target_modules=["query", "value"], modules_to_save=["classifier"], task_type="SEQ_CLS"
    )
    peft_model = get_peft_model(model, config)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=2e-3)
    data = relabel(rows, task)
    rng = random.Random(seed)
    peft_model.train()
    for _ in range(steps):
        chunk = rng.sample(data, 16)
        enc, labels = next(batches(tokenizer, chunk, 16))
        loss = peft_model(**enc, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    peft_model.save_pretrained(folder)
    return time.perf_counter() - start


def stage_train(workdir: Path) -> dict[str, float]:
    train, _, _ = sentences()
    seconds = {}
    plan = [("sst2", "sentiment", 200, 0)] + [(f"zoo-{t}", t, 120, i + 1) for i, t in enumerate(TASKS)]
    for name, task, steps, seed in plan:
        folder = workdir / "loras" / name
        if (folder / "adapter_config.json").is_file():
            continue
        seconds[name] = train_lora(folder, task, train, steps, seed)
        print(f"trained {name}: {steps} steps in {seconds[name]:.0f} s", flush=True)
    return seconds


def fresh_model(seed: int = 0) -> Any:
    return load_classifier(default_model_dir(), seed=seed)[1]


def lora_accuracy(folder: Path, rows: list[tuple[str, int]], tokenizer: Any, head_only: bool = False) -> float:
    """Accuracy of a PEFT LoRA; with ``head_only`` its weight updates are zeroed (its trained head kept)."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(fresh_model(), folder)
    if head_only:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.zero_()
    return accuracy(model, tokenizer, rows)


def lotr_accuracy(files: Any, rows: list[tuple[str, int]], tokenizer: Any) -> float:
    from tensorlotr.nn import LoTRModel

    return accuracy(LoTRModel.from_adapter_files(fresh_model(), files), tokenizer, rows)


def kept(score: float, low: float, high: float) -> float:
    """The share of the gain ``high - low`` that ``score`` keeps."""
    return (score - low) / (high - low)


def calibration_setup(tokenizer: Any, texts: list[str], heal_steps: int) -> Any:
    from tensorlotr.jobs.calibration import Calibration, tokenized_batches

    batches = tokenized_batches(tokenizer, texts, batch_size=16, max_length=MAX_LENGTH)
    return Calibration(inputs=batches, base_model=fresh_model(), heal_steps=heal_steps, heal_lr=HEAL_LR)


HEAL_STEPS = 100
HEAL_LR = 1e-3  # the zoo's heal (cores only)
CONVERT_HEAL_LR = 3e-3  # conversion heals cores and factors


def stage_convert(workdir: Path, ranks: list[int]) -> dict[str, Any]:
    from tensorlotr.io import read_adapter
    from tensorlotr.io.peft_lora import PeftLoRA
    from tensorlotr.jobs.calibration import calibrate
    from tensorlotr.jobs.convert import convert_lora

    _, dev, texts = sentences()
    tokenizer = load_classifier(default_model_dir())[0]
    folder = workdir / "loras" / "sst2"
    lora_acc = lora_accuracy(folder, dev, tokenizer)
    head_acc = lora_accuracy(folder, dev, tokenizer, head_only=True)
    lora_params = PeftLoRA(folder).n_params
    out: dict[str, Any] = {"lora_accuracy": lora_acc, "head_only_accuracy": head_acc, "lora_params": lora_params}
    cal = calibration_setup(tokenizer, texts, 0)
    cal.heal_lr, cal.heal_factors = CONVERT_HEAL_LR, True
    start, cpu_start = time.perf_counter(), time.process_time()
    cal.stats = calibrate(cal.base_model, cal.inputs, list(PeftLoRA(folder).modules))
    out["calibration_seconds"] = time.perf_counter() - start
    out["calibration_cpu_seconds"] = time.process_time() - cpu_start
    rows = []
    for rank in ranks:
        for mode in ("weight", "calibrated", "calibrated+heal", "weight+heal"):
            target = workdir / "convert" / f"{mode}-{rank}"
            cal.heal_steps = HEAL_STEPS if mode.endswith("+heal") else 0
            cal.objective = "weight" if mode == "weight+heal" else "output"
            started, cpu_started = time.perf_counter(), time.process_time()
            report = convert_lora(folder, target, rank=rank, force=True, calibration=None if mode == "weight" else cal)
            seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
            score = lotr_accuracy(read_adapter(target), dev, tokenizer)
            row = {
                "rank": rank, "mode": mode, "lotr_params": report.lotr_params,
                "params_vs_lora": lora_params / report.lotr_params, "accuracy": score,
                "gain_kept": kept(score, head_acc, lora_acc), "seconds": seconds, "cpu_seconds": cpu_seconds,
                "weight_error": report.relative_error, "output_error": report.output_error,
                "heal": report.heal,
            }  # fmt: skip
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "heal"}), flush=True)
    out["rows"] = rows
    return out


ZOO_MODES = {  # name -> (objective with calibration, or None without; fairness, min_retention, heal)
    "weight": (None, "none", None, False),
    "weight-fair": (None, "relative", None, False),
    "calibrated": ("output", "none", None, False),
    "calibrated-fair": ("output", "relative", None, False),
    "calibrated-fair+heal": ("output", "relative", None, True),
    "calibrated-fair-min0.9": ("output", "relative", 0.9, False),
    "calibrated-fair-min0.8": ("output", "relative", 0.8, False),
    "weight-fair+heal": ("weight", "relative", None, True),
}


def stage_zoo(workdir: Path, rank: int, modes: list[str]) -> dict[str, Any]:
    from tensorlotr.io.peft_lora import PeftLoRA
    from tensorlotr.jobs.calibration import calibrate
    from tensorlotr.jobs.zoo import compress_zoo

    _, dev, texts = sentences()
    tokenizer = load_classifier(default_model_dir())[0]
    folders = [workdir / "loras" / f"zoo-{t}" for t in TASKS]
    tasks: dict[str, Any] = {}
    for task, folder in zip(TASKS, folders, strict=True):
        rows = relabel(dev, task)
        positive = sum(y for _, y in rows) / len(rows)
        tasks[task] = {"majority": max(positive, 1 - positive), "lora": lora_accuracy(folder, rows, tokenizer)}
        print(task, json.dumps(tasks[task]), flush=True)
    out: dict[str, Any] = {"tasks": tasks, "separate_params": sum(PeftLoRA(f).n_params for f in folders)}
    cal = calibration_setup(tokenizer, texts, 0)
    start = time.perf_counter()
    cal.stats = calibrate(cal.base_model, cal.inputs, list(PeftLoRA(folders[0]).modules))
    out["calibration_seconds"] = time.perf_counter() - start
    results = []
    for mode in modes:
        objective, fairness, min_retention, heal = ZOO_MODES[mode]
        cal.heal_steps = HEAL_STEPS if heal else 0
        cal.objective = objective or "output"
        started = time.perf_counter()
        report = compress_zoo(
            folders, None, names=list(TASKS), rank=rank, calibration=cal if objective else None,
            fairness=fairness, min_retention=min_retention,
        )  # fmt: skip
        seconds = time.perf_counter() - started
        assert report.zoo is not None
        row: dict[str, Any] = {
            "mode": mode, "rank": rank, "stored_params": report.stored_params, "seconds": seconds,
            "ranks": {g["group"]: g["rank"] for g in report.groups},
            "factor_and_core_params": report.stored_params - sum(t.numel() for k, t in report.zoo.tensors.items()
                                                                 if ".modules_to_save." in k),
            "storage_vs_separate": out["separate_params"] / report.stored_params, "adapters": {},
        }  # fmt: skip
        for entry in report.adapters:
            task = entry.adapter
            score = lotr_accuracy(report.zoo.adapter(task), relabel(dev, task), tokenizer)
            row["adapters"][task] = {
                "accuracy": score, "gain_kept": kept(score, tasks[task]["majority"], tasks[task]["lora"]),
                "weight_error": entry.relative_error, "output_error": entry.output_error,
                "healed_output_error": entry.healed_output_error, "heal": entry.heal,
            }  # fmt: skip
        results.append(row)
        gains = {t: round(a["gain_kept"], 4) for t, a in row["adapters"].items()}
        print(mode, f"{seconds:.1f} s", json.dumps(gains), flush=True)
    out["rows"] = results
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/tensorlotr-calibration-bench"))
    parser.add_argument("--stage", choices=["train", "convert", "zoo", "all"], default="all")
    parser.add_argument("--ranks", default="2,4,8", help="conversion ranks, comma-separated")
    parser.add_argument("--zoo-rank", type=int, default=16)
    parser.add_argument("--zoo-modes", default="weight,weight-fair,calibrated,calibrated-fair,calibrated-fair+heal")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    args.workdir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"train_seconds": stage_train(args.workdir)}
    if args.stage in ("convert", "all"):
        results["convert"] = stage_convert(args.workdir, [int(r) for r in args.ranks.split(",")])
    if args.stage in ("zoo", "all"):
        results["zoo"] = stage_zoo(args.workdir, args.zoo_rank, args.zoo_modes.split(","))
    name = f"results-{args.stage}" + (f"-rank{args.zoo_rank}" if args.stage == "zoo" else "")
    (args.workdir / f"{name}.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
