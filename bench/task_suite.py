"""A suite of eight task LoRAs on the packaged MiniLM, and their compression scored on held-out sentences.

    python bench/task_suite.py [--workdir DIR] [--stage train|eval|all] [--out bench/results/task_suite]

1. Trains (once; cached in ``--workdir``) eight PEFT LoRAs (task ``SEQ_CLS``, a 2-label head in
   ``modules_to_save``, batches of 16 sentences of at most 32 tokens, half of each batch from
   each class, AdamW) over SST-2 sentences, broad and narrow tasks of :data:`SUITE`: sentiment,
   negation present, an evaluative adjective from a list, a number, a long sentence, a comma, a
   colon / semicolon / dash, film-making words; 100-200 steps, lr 5e-4 to 3e-3, ranks 4-16,
   ``query`` + ``value`` or every linear layer of the encoder.
2. Splits, fixed by seed: SST-2 ``train.tsv`` (less the sentences also in ``dev.tsv``) shuffled
   into a training pool, a calibration pool and a validation pool; ``dev.tsv`` is the held-out
   pool. Per task: its own training sample (8,000 rows of the training pool), 256 calibration
   sentences, 150 validation and 300 held-out sentences, the last three balanced by the task's
   label. Held-out sentences are never used for training, calibration, heal or choosing a setting.
3. Per adapter, on its held-out sentences: accuracy of the head only (the LoRA's trained head,
   its weight updates zeroed) and of the LoRA; then of its compressions, with the retained gain
   ``(acc - acc_head_only) / (acc_lora - acc_head_only)`` and the agreement (share of
   predictions equal to the LoRA's):

   * conversion (``convert_lora``) at the largest rank storing at most 1/10 of the LoRA's
     factor parameters, modes of :data:`CONVERT_MODES` (weight or calibrated objective on the
     task's calibration sentences, with or without a heal of cores and factors);
   * zoos (``compress_zoo``) of each half of the suite at the largest rank storing at most 1/8
     of the separate LoRAs' factors, and of the whole suite at the largest rank at least 10x
     smaller, modes of :data:`ZOO_MODES` (calibrated on the members' calibration sentences).

4. With ``--parts guarantee``: zoos compressed with ``min_retention`` 0.95 held on 400 more sentences
   of each member's validation pool (its labels: the retained gain) through private residuals, at
   the budget rank and at a half and a quarter of it; reported on the held-out sentences with the
   storage they came to.
5. Cross-validation of the mode across adapters: the mode with the best worst case (then mean)
   retained gain on half A's *validation* sentences is reported on half B's held-out
   sentences, and vice versa.

Markdown tables go to stdout, JSON to ``--out``. One torch thread.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tensorlotr.jobs.data import read_tsv  # noqa: E402
from tensorlotr.jobs.demo import default_model_dir, load_classifier  # noqa: E402

SST2 = REPO.parent / "shared" / "data" / "sst2"
MAX_LENGTH = 32
BATCH = 16
QV = ["query", "value"]
ALL_LINEAR = r".*encoder\.layer\.\d+\..*(query|key|value|dense)$"  # every linear layer of the encoder
NEGATION = re.compile(r"\b(not|no|never|nothing|nobody|none|neither|nor|without|cannot)\b|n't")
NUMBER = re.compile(
    r"\d|\b(one|two|three|four|five|six|seven|eight|nine|ten|twenty|hundred|thousand|million|"
    r"first|second|third|dozen|half)\b"
)
ADJECTIVES = re.compile(
    r"\b(good|bad|great|funny|best|worst|beautiful|boring|dull|interesting|entertaining|fun|charming|"
    r"original|predictable|smart|clever|stupid|silly|sweet|brilliant|awful|terrible|wonderful|"
    r"fascinating|compelling|enjoyable|pretentious|tedious|moving|powerful|fresh|solid|mediocre|"
    r"lame|hilarious|touching|flat|dumb|engaging)\b"
)
FILM = re.compile(
    r"\b(film|films|movie|movies|actor|actors|actress|acting|performance|performances|director|"
    r"directed|directing|cast|script|screenplay|screen|hollywood|cinema|camera|scene|scenes|"
    r"character|characters|plot)\b"
)


@dataclass(frozen=True)
class Task:
    """One adapter of the suite: its label of a sentence and how its LoRA is trained."""

    name: str
    label: Callable[[str, int], int]  # (sentence, SST-2 label) -> task label
    kind: str  # "broad" or "narrow"
    targets: Any  # PEFT target_modules
    rank: int
    lr: float
    steps: int
    half: str  # "A" or "B": the cross-validation halves, and the zoo groups


SUITE = [
    Task("sentiment", lambda s, y: y, "broad", QV, 8, 1e-3, 200, "A"),
    Task("negation", lambda s, y: int(NEGATION.search(s) is not None), "narrow", QV, 4, 2e-3, 150, "A"),
    Task("long", lambda s, y: int(len(s.split()) > 12), "broad", ALL_LINEAR, 4, 1e-3, 100, "A"),
    Task("film-words", lambda s, y: int(FILM.search(s) is not None), "narrow", ALL_LINEAR, 16, 5e-4, 150, "A"),
    Task("adjective", lambda s, y: int(ADJECTIVES.search(s) is not None), "narrow", ALL_LINEAR, 8, 5e-4, 150, "B"),
    Task("number", lambda s, y: int(NUMBER.search(s) is not None), "narrow", QV, 16, 3e-3, 120, "B"),
    Task("comma", lambda s, y: int("," in s), "narrow", QV, 8, 3e-3, 100, "B"),
    Task(
        "colon-dash", lambda s, y: int(any(c in s for c in ":;") or "--" in s), "narrow", ALL_LINEAR, 8, 2e-3, 150, "B"
    ),
]
TASKS = {t.name: t for t in SUITE}
CALIBRATION_SIZE, VALIDATION_SIZE, HELD_OUT_SIZE, TRAIN_SIZE = 256, 100, 300, 8000
GUARANTEE_SIZE = 400  # sentences a guarantee is held on (``--parts guarantee``), apart from the validation ones


# --- data ------------------------------------------------------------------------------------


def pools() -> dict[str, list[tuple[str, int]]]:
    """The four disjoint pools of (sentence, SST-2 label): train, calibration, validation, held-out."""
    dev = read_tsv(SST2 / "dev.tsv")
    train_rows = read_tsv(SST2 / "train.tsv")
    train_set = {s for s, _ in train_rows}
    dev_set = {s for s, _ in dev}
    train_rows = list({s: (s, y) for s, y in train_rows if s not in dev_set}.values())  # deduplicated
    random.Random(0).shuffle(train_rows)
    held = [(s, y) for s, y in {s: (s, y) for s, y in dev}.values() if s not in train_set]
    return {"train": train_rows[:40000], "calibration": train_rows[40000:50000], "validation": train_rows[50000:],
            "held_out": held}  # fmt: skip


def balanced(rows: list[tuple[str, int]], task: Task, size: int, seed: int) -> list[tuple[str, int]]:
    """``size`` rows relabelled by ``task``, half of each label (fewer if a label runs short), shuffled."""
    labelled = [(s, task.label(s, y)) for s, y in rows]
    rng = random.Random(seed)
    out = []
    for value in (0, 1):
        chosen = [r for r in labelled if r[1] == value]
        out += rng.sample(chosen, min(size // 2, len(chosen)))
    rng.shuffle(out)
    return out


def splits(task: Task, pool: dict[str, list[tuple[str, int]]]) -> dict[str, list[tuple[str, int]]]:
    """The task's train, calibration, validation and held-out rows (its own samples of the pools)."""
    seed = 100 * (SUITE.index(task) + 1)
    train = random.Random(seed).sample(pool["train"], TRAIN_SIZE)
    validation = balanced(pool["validation"], task, VALIDATION_SIZE, seed + 2)
    seen = {s for s, _ in validation}
    return {
        "train": [(s, task.label(s, y)) for s, y in train],
        "calibration": balanced(pool["calibration"], task, CALIBRATION_SIZE, seed + 1),
        "validation": validation,
        "held_out": balanced(pool["held_out"], task, HELD_OUT_SIZE, seed + 3),
        "guarantee": balanced([r for r in pool["validation"] if r[0] not in seen], task, GUARANTEE_SIZE, seed + 4),
    }


def encode(tokenizer: Any, texts: list[str]) -> dict[str, torch.Tensor]:
    return dict(tokenizer(texts, padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt"))


# --- training --------------------------------------------------------------------------------


def train_lora(folder: Path, task: Task, rows: list[tuple[str, int]]) -> float:
    """Train ``task``'s PEFT LoRA on ``rows`` (balanced batches) and save it to ``folder``; the seconds taken."""
    from peft import LoraConfig, get_peft_model

    start = time.perf_counter()
    tokenizer, model = load_classifier(default_model_dir(), seed=0)
    config = LoraConfig(
        r=task.rank, lora_alpha=2 * task.rank, target_modules=task.targets, modules_to_save=["classifier"],
        task_type="SEQ_CLS",
    )  # fmt: skip
    peft_model = get_peft_model(model, config)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=task.lr)
    by_label = [[r for r in rows if r[1] == v] for v in (0, 1)]
    rng = random.Random(SUITE.index(task))
    peft_model.train()
    for _ in range(task.steps):
        chunk = rng.sample(by_label[0], BATCH // 2) + rng.sample(by_label[1], BATCH // 2)
        loss = peft_model(**encode(tokenizer, [s for s, _ in chunk]), labels=torch.tensor([y for _, y in chunk])).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    tmp = folder.with_name(folder.name + ".tmp")
    peft_model.save_pretrained(tmp)
    tmp.rename(folder)
    return time.perf_counter() - start


def stage_train(workdir: Path, pool: dict[str, list[tuple[str, int]]], names: list[str]) -> dict[str, float]:
    seconds = {}
    for task in (TASKS[n] for n in names):
        folder = workdir / "loras" / task.name
        if (folder / "adapter_config.json").is_file():
            continue
        seconds[task.name] = train_lora(folder, task, splits(task, pool)["train"])
        print(f"trained {task.name}: {task.steps} steps in {seconds[task.name]:.0f} s", flush=True)
    return seconds


# --- evaluation ------------------------------------------------------------------------------

HEAL_STEPS = 30
CONVERT_HEAL_LR = 3e-3  # conversion heals cores and factors
ZOO_HEAL_LR = 1e-3  # a zoo heals each adapter's cores
#: name -> (objective with calibration, or None without; heal steps)
CONVERT_MODES = {"weight": (None, 0), "output": ("output", 0), "weight+heal": ("weight", HEAL_STEPS)}  # fmt: skip
#: name -> (objective with calibration, or None without; fairness; heal steps)
ZOO_MODES = {
    "weight-plain": (None, "none", 0),
    "weight-fair": (None, "relative", 0),
    "output-fair": ("output", "relative", 0),
}
#: with ``--zoo-heal`` (each adapter's cores healed: 30 steps a member, minutes per zoo on this machine)
ZOO_HEAL_MODES = {"output-fair+heal": ("output", "relative", HEAL_STEPS)}
SPLITS = ("validation", "held_out")
#: the retention that ``--parts guarantee`` asks each zoo member to hold on its validation sentences
MIN_RETENTION = 0.95


class Evaluator:
    """The base model and tokenizer, and predictions of adapted copies of it on rows of a task."""

    def __init__(self) -> None:
        self.tokenizer, self.base = load_classifier(default_model_dir(), seed=0)
        self.base.eval()

    def fresh(self) -> Any:
        return copy.deepcopy(self.base)

    @torch.inference_mode()
    def predict(self, model: Any, rows: list[tuple[str, int]]) -> list[int]:
        model.eval()
        order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))  # similar lengths: little padding
        out = [0] * len(rows)
        for start in range(0, len(order), 64):
            idx = order[start : start + 64]
            logits = model(**encode(self.tokenizer, [rows[i][0] for i in idx])).logits
            for i, p in zip(idx, logits.argmax(-1).tolist(), strict=True):
                out[i] = p
        return out

    def lora(self, folder: Path, head_only: bool = False) -> Any:
        from peft import PeftModel

        model = PeftModel.from_pretrained(self.fresh(), folder)
        if head_only:
            with torch.no_grad():
                for name, param in model.named_parameters():
                    if "lora_B" in name:
                        param.zero_()
        return model

    def lotr(self, files: Any) -> Any:
        from tensorlotr.nn import LoTRModel

        return LoTRModel.from_adapter_files(self.fresh(), files)


def accuracy(preds: list[int], rows: list[tuple[str, int]]) -> float:
    return sum(int(p == y) for p, (_, y) in zip(preds, rows, strict=True)) / len(rows)


def scores(preds: dict[str, list[int]], ref: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    """Per split: accuracy, retained gain over the head only, agreement with the LoRA's predictions."""
    out = {}
    for split in SPLITS:
        acc = accuracy(preds[split], data[split])
        low, high = ref[split]["head_only"], ref[split]["lora"]
        agree = sum(int(a == b) for a, b in zip(preds[split], ref[split]["lora_preds"], strict=True))
        out[split] = {"accuracy": acc, "retained": (acc - low) / (high - low) if high != low else float("nan"),
                      "agreement": agree / len(preds[split])}  # fmt: skip
    return out


def predict_splits(ev: Evaluator, model: Any, data: dict[str, Any]) -> dict[str, list[int]]:
    return {split: ev.predict(model, data[split]) for split in SPLITS}


def heads_params(zoo: Any) -> int:
    return sum(t.numel() for k, t in zoo.tensors.items() if ".modules_to_save." in k)


def conversion_rank(folder: Path, ratio: float) -> tuple[int, int, int]:
    """The largest Tucker rank whose factors and cores are at most 1/``ratio`` of the LoRA's; (rank, lotr, lora)."""
    from tensorlotr.io.peft_lora import PeftLoRA
    from tensorlotr.jobs.convert import convert_lora

    lora_params = PeftLoRA(folder).n_params
    best = None
    for rank in range(1, 65):
        lotr = sum(g.lotr_params for g in convert_lora(folder, None, rank=rank).groups)
        if lotr * ratio > lora_params:
            break
        best = (rank, lotr, lora_params)
    assert best is not None, f"{folder}: no rank stores 1/{ratio} of the LoRA"
    return best


def zoo_rank(folders: list[Path], names: list[str], ratio: float) -> tuple[int, int, int]:
    """The largest zoo rank storing at most 1/``ratio`` of the separate LoRAs' factors; (rank, stored, separate)."""
    from tensorlotr.jobs.zoo import compress_zoo

    best = None
    for rank in range(1, 129):
        report = compress_zoo(folders, None, names=names, rank=rank, fairness="none")
        assert report.zoo is not None
        stored = report.stored_params - heads_params(report.zoo)
        if stored * ratio > report.separate_params:
            break
        best = (rank, stored, report.separate_params)
    assert best is not None, f"no zoo rank stores 1/{ratio} of {names}"
    return best


def zoo_plans(names: list[str]) -> list[tuple[str, list[str], float]]:
    """The zoos measured: (name, members, storage ratio): each half at 1/8, the whole suite at 1/10."""
    plans = [(f"half-{h}", [n for n in names if TASKS[n].half == h], 8.0) for h in ("A", "B")]
    return [*plans, ("whole-suite", names, 10.0)]


def zoo_calibration(ev: Evaluator, data: dict[str, Any], members: list[str]) -> list[dict[str, torch.Tensor]]:
    """A zoo's calibration batches: an equal share of each member's calibration sentences, shuffled."""
    from tensorlotr.jobs.calibration import tokenized_batches

    share = CALIBRATION_SIZE // len(members)
    texts = [s for n in members for s, _ in data[n]["calibration"][:share]]
    random.Random(7).shuffle(texts)
    return tokenized_batches(ev.tokenizer, texts, BATCH, MAX_LENGTH)


def stage_eval(
    workdir: Path,
    pool: dict[str, Any],
    names: list[str],
    parts: list[str],
    out: dict[str, Any],
    save: Callable,
    zoo_heal: bool = False,
    zoo_names: tuple[str, ...] = ("half-A", "half-B", "whole-suite"),
) -> None:
    from tensorlotr.io.peft_lora import PeftLoRA
    from tensorlotr.jobs.calibration import Calibration, calibrate, tokenized_batches
    from tensorlotr.jobs.convert import convert_lora
    from tensorlotr.jobs.zoo import compress_zoo

    ev = Evaluator()
    data = {n: splits(TASKS[n], pool) for n in names}
    folders = {n: workdir / "loras" / n for n in names}
    refs: dict[str, Any] = {}
    adapters = out.setdefault("adapters", {})
    for name in names:
        task, folder = TASKS[name], folders[name]
        lora_preds = predict_splits(ev, ev.lora(folder), data[name])
        head_preds = predict_splits(ev, ev.lora(folder, head_only=True), data[name])
        refs[name] = {s: {"lora": accuracy(lora_preds[s], data[name][s]), "lora_preds": lora_preds[s],
                          "head_only": accuracy(head_preds[s], data[name][s])} for s in SPLITS}  # fmt: skip
        rows = data[name]
        adapters[name] = {
            "kind": task.kind, "targets": "q+v" if task.targets == QV else "all-linear", "rank": task.rank,
            "lr": task.lr, "steps": task.steps, "half": task.half, "lora_params": PeftLoRA(folder).n_params,
            "sizes": {s: len(rows[s]) for s in ("train", "calibration", "validation", "held_out")},
            "positives": {s: sum(y for _, y in rows[s]) for s in ("calibration", "validation", "held_out")},
            **{s: {k: v for k, v in refs[name][s].items() if k != "lora_preds"} for s in SPLITS},
        }  # fmt: skip
        print(name, json.dumps({s: adapters[name][s] for s in SPLITS}), flush=True)
    save()

    # (a) conversion at <= 1/10 of the LoRA's parameters
    conversion = out.setdefault("conversion", {})
    for name in names if "convert" in parts else []:
        folder, rows = folders[name], data[name]
        rank, lotr_params, lora_params = conversion_rank(folder, 10)
        inputs = tokenized_batches(ev.tokenizer, [s for s, _ in rows["calibration"]], BATCH, MAX_LENGTH)
        started = time.perf_counter()
        stats = calibrate(ev.fresh(), inputs, list(PeftLoRA(folder).modules))
        entry: dict[str, Any] = {"rank": rank, "lotr_params": lotr_params, "params_vs_lora": lora_params / lotr_params,
                                 "calibration_seconds": time.perf_counter() - started, "modes": {}}  # fmt: skip
        for mode, (objective, heal) in CONVERT_MODES.items():
            cal = None
            if objective is not None:
                cal = Calibration(inputs=inputs, base_model=ev.fresh(), stats=stats, objective=objective,
                                  heal_steps=heal, heal_lr=CONVERT_HEAL_LR, heal_factors=True)  # fmt: skip
            started = time.perf_counter()
            report = convert_lora(folder, None, rank=rank, calibration=cal)
            seconds = time.perf_counter() - started
            assert report.adapter is not None
            entry["modes"][mode] = {**scores(predict_splits(ev, ev.lotr(report.adapter), rows), refs[name], rows),
                                    "seconds": seconds, "weight_error": report.relative_error,
                                    "output_error": report.output_error}  # fmt: skip
        conversion[name] = entry
        print("convert", name, rank, json.dumps({m: round(v["held_out"]["retained"], 4)
                                                 for m, v in entry["modes"].items()}), flush=True)  # fmt: skip
        save()

    # (c) held-out guarantees: min_retention held on each adapter's guarantee sentences (labels: the
    # retained gain), by a raised rank (conversion) or private residuals (zoos); reported on held-out ones
    from tensorlotr.jobs.calibration import Evaluation

    def guarantee_set(name: str) -> Evaluation:
        rows = data[name]["guarantee"]
        return Evaluation(tokenized_batches(ev.tokenizer, [s for s, _ in rows], 64, MAX_LENGTH), [y for _, y in rows])

    guaranteed_conversion = out.setdefault("guaranteed_conversion", {})
    for name in names if "guarantee" in parts else []:
        folder, rows = folders[name], data[name]
        rank, _, lora_params = conversion_rank(folder, 10)
        inputs = tokenized_batches(ev.tokenizer, [s for s, _ in rows["calibration"]], BATCH, MAX_LENGTH)
        cal = Calibration(inputs=inputs, base_model=ev.fresh(), objective="weight", heal_steps=HEAL_STEPS,
                          heal_lr=CONVERT_HEAL_LR, heal_factors=True, evaluation=guarantee_set(name))  # fmt: skip
        started = time.perf_counter()
        report = convert_lora(folder, None, rank=rank, calibration=cal, min_retention=MIN_RETENTION)
        seconds = time.perf_counter() - started
        assert report.adapter is not None
        guaranteed_conversion[name] = {
            **scores(predict_splits(ev, ev.lotr(report.adapter), rows), refs[name], rows),
            "start_rank": rank, "ranks": [g.rank for g in report.groups], "lotr_params": report.lotr_params,
            "params_vs_lora": lora_params / report.lotr_params, "seconds": seconds,
            "guarantee_figure": report.retention, "tries": len(report.retention_tries) or 1,
        }  # fmt: skip
        ratio = lora_params / report.lotr_params
        print("guaranteed convert", name, next(g.rank for g in report.groups), f"1/{ratio:.1f}",
              round(guaranteed_conversion[name]["held_out"]["retained"], 4), flush=True)  # fmt: skip
        save()

    guaranteed = out.setdefault("guaranteed_zoos", {})
    for zoo_name, members, ratio in zoo_plans(names) if "guarantee" in parts else []:
        if len(members) < 2 or zoo_name not in zoo_names:
            continue
        member_folders = [folders[n] for n in members]
        budget_rank, _, separate = zoo_rank(member_folders, members, ratio)
        inputs = zoo_calibration(ev, data, members)
        evaluation = {n: guarantee_set(n) for n in members}
        entry = guaranteed.setdefault(zoo_name, {"members": members, "separate_params": separate, "runs": {}})
        for rank in sorted({budget_rank, max(1, budget_rank // 2), max(1, budget_rank // 4)}, reverse=True):
            cal = Calibration(inputs=inputs, base_model=ev.fresh(), objective="weight", evaluation=evaluation)
            started = time.perf_counter()
            report = compress_zoo(member_folders, None, names=members, rank=rank, calibration=cal, fairness="none",
                                  min_retention=MIN_RETENTION)  # fmt: skip
            seconds = time.perf_counter() - started
            assert report.zoo is not None
            stored = report.stored_params - heads_params(report.zoo)
            per = {}
            for n, row in zip(members, report.adapters, strict=True):
                per[n] = scores(predict_splits(ev, ev.lotr(report.zoo.adapter(n)), data[n]), refs[n], data[n])
                per[n]["residual"] = row.residual
                per[n]["guarantee_figure"] = row.retention
            entry["runs"][str(rank)] = {"rank": rank, "stored_params": stored, "storage_vs_separate": separate / stored,
                                        "seconds": seconds, "adapters": per, "notes": report.notes}  # fmt: skip
            print("guaranteed zoo", zoo_name, rank, f"1/{separate / stored:.1f}", f"{seconds:.0f} s",
                  json.dumps({n: round(v["held_out"]["retained"], 4) for n, v in per.items()}), flush=True)  # fmt: skip
            save()

    # (b) zoos: each half at <= 1/8 of the separate storage, the whole suite at >= 10x
    zoos = out.setdefault("zoos", {})
    for zoo_name, members, ratio in zoo_plans(names) if "zoo" in parts else []:
        if len(members) < 2 or zoo_name not in zoo_names:
            continue
        member_folders = [folders[n] for n in members]
        rank, stored, separate = zoo_rank(member_folders, members, ratio)
        inputs = zoo_calibration(ev, data, members)
        modules = sorted({m for f in member_folders for m in PeftLoRA(f).modules})
        stats = calibrate(ev.fresh(), inputs, modules)
        entry = {"members": members, "rank": rank, "stored_params": stored, "separate_params": separate,
                 "storage_vs_separate": separate / stored, "modes": {}}  # fmt: skip
        for mode, (objective, fairness, heal) in {**ZOO_MODES, **(ZOO_HEAL_MODES if zoo_heal else {})}.items():
            cal = None
            if objective is not None:
                cal = Calibration(inputs=inputs, base_model=ev.fresh(), stats=stats, objective=objective,
                                  heal_steps=heal, heal_lr=ZOO_HEAL_LR)  # fmt: skip
            started = time.perf_counter()
            report = compress_zoo(member_folders, None, names=members, rank=rank, calibration=cal, fairness=fairness)
            seconds = time.perf_counter() - started
            assert report.zoo is not None
            per = {}
            for n in members:
                per[n] = scores(predict_splits(ev, ev.lotr(report.zoo.adapter(n)), data[n]), refs[n], data[n])
            entry["modes"][mode] = {"seconds": seconds, "adapters": per}
            print("zoo", zoo_name, rank, mode, f"{seconds:.0f} s",
                  json.dumps({n: round(v["held_out"]["retained"], 4) for n, v in per.items()}), flush=True)  # fmt: skip
        zoos[zoo_name] = entry
        save()


# --- cross-validation and tables ---------------------------------------------------------------


def choose(table: dict[str, dict[str, Any]], members: list[str]) -> str:
    """The mode with the best worst-case (then mean) retained gain on ``members``' validation sentences."""

    def key(mode: str) -> tuple[float, float]:
        values = [table[mode][n]["validation"]["retained"] for n in members]
        return min(values), sum(values) / len(values)

    return max(table, key=key)


def cross_validate(table: dict[str, dict[str, Any]], halves: dict[str, list[str]]) -> dict[str, Any]:
    """Mode chosen on one half's validation sentences, reported on the other half's held-out sentences."""
    out: dict[str, Any] = {"folds": []}
    reported: list[tuple[str, float, float]] = []
    for chosen_on, reported_on in (("A", "B"), ("B", "A")):
        if not halves[chosen_on] or not halves[reported_on]:
            continue
        mode = choose(table, halves[chosen_on])
        rows = [(n, table[mode][n]["held_out"]["retained"], table[mode][n]["held_out"]["agreement"])
                for n in halves[reported_on]]  # fmt: skip
        reported += rows
        fold = {"chosen_on": chosen_on, "mode": mode, "reported_on": reported_on}
        fold.update(retained={n: r for n, r, _ in rows}, agreement={n: a for n, _, a in rows})
        out["folds"].append(fold)
    if reported:
        worst = min(reported, key=lambda r: r[1])
        out.update(mean=sum(r[1] for r in reported) / len(reported), worst=worst[1], worst_adapter=worst[0],
                   mean_agreement=sum(r[2] for r in reported) / len(reported))  # fmt: skip
    return out


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def tables(out: dict[str, Any]) -> str:
    lines = ["### Suite", "", "| adapter | kind | targets | rank | steps | lr | LoRA params | held-out (positives) "
             "| head only | LoRA | gain |", "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    ads = out.get("adapters", {})
    for n, a in ads.items():
        h = a["held_out"]
        lines.append(f"| {n} ({a['half']}) | {a['kind']} | {a['targets']} | {a['rank']} | {a['steps']} | {a['lr']:g} "
                     f"| {a['lora_params']:,} | {a['sizes']['held_out']} ({a['positives']['held_out']}) "
                     f"| {h['head_only']:.3f} | {h['lora']:.3f} | {h['lora'] - h['head_only']:+.3f} |")  # fmt: skip
    conv = out.get("conversion", {})
    halves = {h: [n for n in conv if ads[n]["half"] == h] for h in ("A", "B")}
    if conv:
        modes = list(next(iter(conv.values()))["modes"])
        lines += ["", "### Conversion at <= 1/10 of the LoRA's parameters (held-out: retained gain / agreement)", "",
                  "| adapter | rank | params vs LoRA | " + " | ".join(modes) + " |",
                  "|---|---|---|" + "---|" * len(modes)]  # fmt: skip
        for n, c in conv.items():
            cells = [f"{pct(c['modes'][m]['held_out']['retained'])} / {pct(c['modes'][m]['held_out']['agreement'])}"
                     for m in modes]  # fmt: skip
            lines.append(f"| {n} | {c['rank']} | 1/{c['params_vs_lora']:.1f} | " + " | ".join(cells) + " |")
        for stat, fn in (("mean", lambda v: sum(v) / len(v)), ("worst", min)):
            cells = [pct(fn([c["modes"][m]["held_out"]["retained"] for c in conv.values()])) for m in modes]
            lines.append(f"| **{stat}** | | | " + " | ".join(cells) + " |")
        table = {m: {n: conv[n]["modes"][m] for n in conv} for m in modes}
        out["cross_validation"] = {"conversion": cross_validate(table, halves)}
    for zoo_name, z in out.get("zoos", {}).items():
        modes = list(z["modes"])
        lines += ["", f"### Zoo {zoo_name}: rank {z['rank']}, {z['stored_params']:,} params stored, "
                  f"1/{z['storage_vs_separate']:.1f} of the separate LoRAs (held-out: retained / agreement)", "",
                  "| adapter | " + " | ".join(modes) + " |", "|---|" + "---|" * len(modes)]  # fmt: skip
        for n in z["members"]:
            cells = [f"{pct(z['modes'][m]['adapters'][n]['held_out']['retained'])} / "
                     f"{pct(z['modes'][m]['adapters'][n]['held_out']['agreement'])}" for m in modes]  # fmt: skip
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
        for stat, fn in (("mean", lambda v: sum(v) / len(v)), ("worst", min)):
            cells = [pct(fn([a["held_out"]["retained"] for a in z["modes"][m]["adapters"].values()])) for m in modes]
            lines.append(f"| **{stat}** | " + " | ".join(cells) + " |")
        lines.append("| seconds | " + " | ".join(f"{z['modes'][m]['seconds']:.0f}" for m in modes) + " |")
        table = {m: z["modes"][m]["adapters"] for m in modes}
        if zoo_name == "whole-suite":
            cv_halves = {h: [n for n in z["members"] if ads[n]["half"] == h] for h in ("A", "B")}
            out.setdefault("cross_validation", {})["whole-suite zoo"] = cross_validate(table, cv_halves)
    gconv = out.get("guaranteed_conversion", {})
    if gconv:
        lines += ["", f"### Conversion with min_retention {MIN_RETENTION:.0%} (weight + heal; rank raised from the "
                  f"1/10 rank until the 95% lower bound on {GUARANTEE_SIZE} guarantee sentences holds)", "",
                  "| adapter | rank from | rank kept | params vs LoRA | held-out retained / agreement | seconds |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for n, c in gconv.items():
            kept = "/".join(sorted({f"{r[0]}x{r[1]}" for r in c["ranks"]}))
            lines.append(
                f"| {n} | {c['start_rank']} | {kept} | 1/{c['params_vs_lora']:.1f} | "
                f"{pct(c['held_out']['retained'])} / {pct(c['held_out']['agreement'])} | {c['seconds']:.0f} |"
            )
        for stat, fn in (("mean", lambda v: sum(v) / len(v)), ("worst", min)):
            lines.append(f"| **{stat}** | | | | {pct(fn([c['held_out']['retained'] for c in gconv.values()]))} | |")
    for zoo_name, z in out.get("guaranteed_zoos", {}).items():
        runs = list(z["runs"].values())
        lines += ["", f"### Zoo {zoo_name} with min_retention {MIN_RETENTION:.0%} held on {GUARANTEE_SIZE} "
                  "sentences of each member's validation pool through private residuals "
                  "(held-out: retained / agreement; residual rank)", "",
                  "| adapter | " + " | ".join(f"rank {r['rank']}, 1/{r['storage_vs_separate']:.1f}" for r in runs)
                  + " |", "|---|" + "---|" * len(runs)]  # fmt: skip
        for n in z["members"]:
            cells = []
            for r in runs:
                a = r["adapters"][n]
                res = "/".join(sorted({f"{v[0]}" for v in (a["residual"] or {}).values()})) or "0"
                cells.append(f"{pct(a['held_out']['retained'])} / {pct(a['held_out']['agreement'])}; {res}")
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
        for stat, fn in (("mean", lambda v: sum(v) / len(v)), ("worst", min)):
            cells = [pct(fn([a["held_out"]["retained"] for a in r["adapters"].values()])) for r in runs]
            lines.append(f"| **{stat}** | " + " | ".join(cells) + " |")
        lines.append("| seconds | " + " | ".join(f"{r['seconds']:.0f}" for r in runs) + " |")
    zoo_a, zoo_b = out.get("zoos", {}).get("half-A"), out.get("zoos", {}).get("half-B")
    if zoo_a and zoo_b:  # a mode chosen on the other half's zoo
        table = {m: {**zoo_a["modes"][m]["adapters"], **zoo_b["modes"][m]["adapters"]} for m in zoo_a["modes"]}
        out.setdefault("cross_validation", {})["zoo of a half at 1/8"] = cross_validate(
            table, {"A": zoo_a["members"], "B": zoo_b["members"]}
        )
    cv = out.get("cross_validation", {})
    if cv:
        lines += ["", "### Cross-validation of the mode across adapters (chosen on one half's validation sentences, "
                  "reported on the other half's held-out sentences)", "",
                  "| setting | chosen on A -> reported on B | chosen on B -> reported on A | mean | worst "
                  "| mean agreement |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for setting, c in cv.items():
            folds = {f["chosen_on"]: f for f in c["folds"]}
            cells = []
            for h in ("A", "B"):
                f = folds.get(h)
                cells.append("—" if f is None else f"{f['mode']}: worst {pct(min(f['retained'].values()))}")
            if "mean" in c:
                cells += [pct(c["mean"]), f"{pct(c['worst'])} ({c['worst_adapter']})", pct(c["mean_agreement"])]
            lines.append(f"| {setting} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/tensorlotr-task-suite"))
    parser.add_argument("--stage", choices=["train", "eval", "all"], default="all")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "task_suite")
    parser.add_argument("--tasks", default=",".join(TASKS), help="a subset of the suite, comma-separated")
    parser.add_argument(
        "--parts",
        default="convert,zoo,guarantee",
        help="what --stage eval measures: convert, zoo, guarantee (zoos with min_retention through residuals)",
    )
    parser.add_argument("--zoo-heal", action="store_true", help="also the zoo mode with a heal of every member")
    parser.add_argument("--zoos", default="half-A,half-B,whole-suite", help="which zoos --parts zoo measures")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    (args.workdir / "loras").mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    pool = pools()
    names = args.tasks.split(",")
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        parser.error(f"unknown tasks {unknown}; the suite has {list(TASKS)}")
    previous = args.out / "results.json"  # a run of some --parts keeps the others' results
    out: dict[str, Any] = json.loads(previous.read_text()) if previous.is_file() else {}
    out["train_seconds"] = {**out.get("train_seconds", {}), **stage_train(args.workdir, pool, names)}

    def save() -> None:
        out["seconds"] = time.perf_counter() - start
        path = args.out / "results.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(out, indent=2))
        tmp.replace(path)

    if args.stage in ("eval", "all"):
        stage_eval(
            args.workdir, pool, names, args.parts.split(","), out, save, args.zoo_heal, tuple(args.zoos.split(","))
        )
        text = tables(out)
        save()
        (args.out / "tables.md").write_text(text + "\n")
        print(text)
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
