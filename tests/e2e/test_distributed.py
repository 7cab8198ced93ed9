"""Two processes (torchrun, gloo, CPU): DDP through Trainer and LoTRTrainer, accelerate, FSDP2 each equal one.

The worker, ``tests/dist_worker.py``, runs the three set-ups in one ``torchrun`` launch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from builders import tiny_llama
from dist_worker import GLOBAL_BATCH, LR, STEPS, batch, make_lotr, rows, sgd_steps
from safetensors.torch import load_file

import tensorlotr as tlr

WORKER = Path(__file__).resolve().parents[1] / "dist_worker.py"

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with the gloo backend is unavailable",
)


def adapter_tensors(lotr: tlr.LoTRModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in lotr.adapter_files().tensors.items()}


@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("distributed")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    done = subprocess.run([*command, str(WORKER), str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return out


@pytest.fixture(scope="module")
def single_process() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The adapter before and after STEPS SGD steps on the whole global batches, in this process."""
    lotr = make_lotr()
    start = adapter_tensors(lotr)
    optimizer = torch.optim.SGD([p for p in lotr.parameters() if p.requires_grad], lr=LR)
    sgd_steps(lotr, [batch(ids) for ids in rows().view(STEPS, GLOBAL_BATCH, -1)], optimizer)
    return start, adapter_tensors(lotr)


def checkpoint(out: Path, setup: str) -> dict[str, torch.Tensor]:
    if setup == "trainer":  # a plain Trainer saves the LoTRModel's whole state dict
        lotr = make_lotr()
        lotr.load_state_dict(load_file(str(out / "Trainer" / f"checkpoint-{STEPS}" / "model.safetensors")))
        return adapter_tensors(lotr)
    folder = out / "LoTRTrainer" / f"checkpoint-{STEPS}" if setup == "lotr_trainer" else out / setup
    return adapter_tensors(tlr.LoTRModel.from_pretrained(tiny_llama(seed=0), folder))


@pytest.mark.parametrize("setup", ["trainer", "lotr_trainer", "accelerate", "fsdp2"])
def test_two_processes_equal_one(launched, single_process, setup):
    start, expected = single_process
    for kind in ("factors.", "cores.", "modules_to_save.lm_head."):  # each moved far more than the tolerance
        assert max((expected[k] - start[k]).abs().max().item() for k in expected if k.startswith(kind)) > 1e-3
    got = checkpoint(launched, setup)
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=1e-5, rtol=0, msg=f"{setup}: {key}")
    writes = [json.loads((launched / f"writes-{rank}.json").read_text()) for rank in (0, 1)]
    assert writes[0].get(setup) == 1 and writes[1].get(setup, 0) == 0  # written once, by rank 0
