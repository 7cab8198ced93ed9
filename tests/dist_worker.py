"""One process of the multi-process test: ``torchrun --nproc_per_node 2 tests/dist_worker.py OUT_DIR``.

Trains the same LoTR adapter (tiny Llama, ``q_proj`` and ``v_proj``, ``lm_head`` in
``modules_to_save``) for ``STEPS`` SGD steps of ``GLOBAL_BATCH`` rows, each process taking its
share of every global batch, in three set-ups (gloo, CPU):

- ``trainer``: DDP through a plain ``transformers.Trainer``, checkpointing at the last step;
- ``lotr_trainer``: the same through ``LoTRTrainer``, whose checkpoint is the adapter;
- ``accelerate``: DDP through ``Accelerator.prepare``, then ``save_pretrained`` on every process;
- ``fsdp2``: ``fully_shard`` on each decoder block and on the ``LoTRModel`` (the root, which holds
  the shared factors and the copy of ``lm_head``), then ``save_pretrained`` on every process.

Each process writes ``OUT_DIR/writes-<rank>.json``: how many model files it wrote per set-up.
``tests/e2e/test_distributed.py`` compares the checkpoints with a single-process run.
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from pathlib import Path

import torch
from builders import VOCAB, tiny_llama

import tensorlotr as tlr

STEPS = 5
GLOBAL_BATCH = 8
LENGTH = 8
LR = 0.5
CONFIG = dict(rank=4, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])


def make_lotr() -> tlr.LoTRModel:
    """The same model and adapter on every process: seeded weights and factors."""
    model = tiny_llama(seed=0)
    return tlr.get_lotr_model(model, tlr.LoTRConfig(**CONFIG))


def rows() -> torch.Tensor:
    """Token rows, ``STEPS * GLOBAL_BATCH`` of them; global batch k is rows k*GLOBAL_BATCH onwards."""
    generator = torch.Generator().manual_seed(0)
    return torch.randint(1, VOCAB, (STEPS * GLOBAL_BATCH, LENGTH), generator=generator)


def batch(ids: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def local_batches(rank: int, world: int) -> list[dict[str, torch.Tensor]]:
    """This process's share of each global batch, in step order."""
    share = GLOBAL_BATCH // world
    data = rows().view(STEPS, GLOBAL_BATCH, LENGTH)
    return [batch(data[step, rank * share : (rank + 1) * share]) for step in range(STEPS)]


def sgd_steps(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], optimizer: torch.optim.Optimizer) -> None:
    model.train()
    for inputs in batches:
        loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


class RowDataset(torch.utils.data.Dataset):
    def __init__(self) -> None:
        self.ids = rows()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return batch(self.ids[i])


def run_trainer(out: Path, world: int, trainer_class: type) -> None:
    from transformers import TrainingArguments

    args = TrainingArguments(
        output_dir=str(out / trainer_class.__name__), max_steps=STEPS, train_sampling_strategy="sequential",
        per_device_train_batch_size=GLOBAL_BATCH // world, optim="sgd", learning_rate=LR, lr_scheduler_type="constant",
        max_grad_norm=0.0, save_strategy="steps", save_steps=STEPS, report_to=[], use_cpu=True, ddp_backend="gloo",
        ddp_find_unused_parameters=False, dataloader_num_workers=0, disable_tqdm=True, seed=0, log_level="error",
    )  # fmt: skip
    trainer_class(model=make_lotr(), args=args, train_dataset=RowDataset()).train()


def run_accelerate(out: Path, rank: int, world: int) -> None:
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    lotr = make_lotr()
    optimizer = torch.optim.SGD([p for p in lotr.parameters() if p.requires_grad], lr=LR)
    model, optimizer = accelerator.prepare(lotr, optimizer)
    model.train()
    for inputs in local_batches(rank, world):
        accelerator.backward(model(**inputs).loss)
        optimizer.step()
        optimizer.zero_grad()
    accelerator.wait_for_everyone()
    accelerator.unwrap_model(model).save_pretrained(out / "accelerate", is_main_process=accelerator.is_main_process)


def run_fsdp2(out: Path, rank: int, world: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    lotr = make_lotr()
    for block in lotr.base_model.model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(lotr, mesh=mesh)  # the root: shared factors, the lm_head copy, embeddings
    optimizer = torch.optim.SGD([p for p in lotr.parameters() if p.requires_grad], lr=LR)
    sgd_steps(lotr, local_batches(rank, world), optimizer)
    lotr.save_pretrained(out / "fsdp2", is_main_process=rank == 0)  # every process joins the gathers


class WriteCounter:
    """Counts the model files this process writes (LoTR adapters, Trainer's ``model.safetensors``) per set-up."""

    def __init__(self) -> None:
        import safetensors.torch

        import tensorlotr.io.peft_lotr as peft_lotr

        self.setup = ""
        self.writes: Counter[str] = Counter()
        self._write_adapter, self._save_file = peft_lotr.write_peft_lotr, safetensors.torch.save_file
        peft_lotr.write_peft_lotr = self.write_adapter  # what LoTRModel.save_pretrained writes with
        safetensors.torch.save_file = self.save_file

    def write_adapter(self, *args, **kwargs):
        self.writes[self.setup] += 1
        return self._write_adapter(*args, **kwargs)

    def save_file(self, tensors, filename, *args, **kwargs):
        if Path(filename).name == "model.safetensors":
            self.writes[self.setup] += 1
        return self._save_file(tensors, filename, *args, **kwargs)


def main(out: Path) -> None:
    import torch.distributed as dist
    from transformers import Trainer

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    counter = WriteCounter()
    setups = {
        "trainer": lambda: run_trainer(out, world, Trainer),
        "lotr_trainer": lambda: run_trainer(out, world, tlr.LoTRTrainer),
        "accelerate": lambda: run_accelerate(out, rank, world),
        "fsdp2": lambda: run_fsdp2(out, rank, world),
    }
    for name, run in setups.items():
        counter.setup = name
        run()
        dist.barrier()
    (out / f"writes-{rank}.json").write_text(json.dumps(dict(counter.writes)))
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main(Path(sys.argv[1]))
