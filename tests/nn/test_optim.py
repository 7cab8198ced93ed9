"""transformers.Trainer integration and the projected optimizers."""

from __future__ import annotations

import pytest
import tensorly as tl
import torch
from models import VOCAB, tiny_bert, tiny_gpt2
from safetensors.torch import load_file
from transformers import Trainer, TrainingArguments

import tensorlotr as tlr
from tensorlotr.optim import (
    LoTRAdam,
    LoTRAdamW,
    LoTRSGD,
    LowRankAdam,
    LowRankAdamW,
    LowRankSGD,
    LRSchedulerList,
    OptimizerList,
)


class TokenDataset(torch.utils.data.Dataset):
    def __init__(self, n: int = 16, length: int = 8, labels: str = "class") -> None:
        generator = torch.Generator().manual_seed(0)
        self.ids = torch.randint(2, VOCAB, (n, length), generator=generator)
        self.labels = labels

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.ids[i]
        label = ids.clone() if self.labels == "lm" else torch.tensor(int(ids[0]) % 2)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": label}


def args(tmp_path, **kwargs) -> TrainingArguments:
    defaults = dict(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
        save_strategy="steps", save_steps=1, logging_steps=1, report_to=[], use_cpu=True,
        dataloader_num_workers=0, disable_tqdm=True, seed=0,
    )  # fmt: skip
    defaults.update(kwargs)
    return TrainingArguments(**defaults)


def test_plain_trainer_runs_two_steps_and_saves(tmp_path):
    lotr = tlr.get_lotr_model(tiny_bert(), tlr.LoTRConfig(rank=4, target_modules=["query", "value"]))
    before = lotr.lotr_factors["query"].out_factor.detach().clone()
    trainer = Trainer(model=lotr, args=args(tmp_path), train_dataset=TokenDataset())
    result = trainer.train()
    assert result.global_step == 2
    assert not torch.equal(before, lotr.lotr_factors["query"].out_factor.detach())
    saved = load_file(str(tmp_path / "checkpoint-2" / "model.safetensors"))
    assert "lotr_factors.query.out_factor" in saved


def test_lotr_trainer_saves_adapter_checkpoints_and_resumes(tmp_path):
    def make():
        return tlr.get_lotr_model(tiny_gpt2(), tlr.LoTRConfig(rank=4, target_modules=["c_attn"]))

    full = tlr.LoTRTrainer(
        model=make(), args=args(tmp_path / "a", max_steps=4), train_dataset=TokenDataset(labels="lm")
    )
    full.train()
    checkpoint = tmp_path / "a" / "checkpoint-2"
    assert (checkpoint / "lotr_config.json").is_file() and (checkpoint / "lotr_model.safetensors").is_file()
    assert not (checkpoint / "model.safetensors").exists()  # the base model is not copied into checkpoints
    loaded = tlr.LoTRModel.from_pretrained(tiny_gpt2(), checkpoint)
    assert loaded.lotr_factors["c_attn"].out_factor.shape == (96, 4)

    resumed_model = make()
    resumed = tlr.LoTRTrainer(
        model=resumed_model, args=args(tmp_path / "a", max_steps=4), train_dataset=TokenDataset(labels="lm")
    )
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 4
    final = full.model.tucker("c_attn").to_dense()
    torch.testing.assert_close(resumed_model.tucker("c_attn").to_dense(), final, atol=1e-5, rtol=1e-4)


def test_trainer_with_optimizer_list(tmp_path):
    lotr = tlr.get_lotr_model(
        tiny_bert(), tlr.LoTRConfig(rank=4, target_modules=["query"], modules_to_save=["classifier"])
    )
    factors = [p for n, p in lotr.named_parameters() if p.requires_grad and "lotr_" in n]
    head = list(lotr.base_model.classifier.parameters())
    opt = OptimizerList(torch.optim.AdamW(factors, lr=1e-2), torch.optim.SGD(head, lr=1e-1))
    sched = LRSchedulerList(*(torch.optim.lr_scheduler.LambdaLR(o, lambda step: 1.0) for o in opt.optimizers))
    head_before = lotr.base_model.classifier.weight.detach().clone()
    trainer = Trainer(model=lotr, args=args(tmp_path), train_dataset=TokenDataset(), optimizers=(opt, sched))
    trainer.train()
    assert trainer.state.global_step == 2
    assert not torch.equal(head_before, lotr.base_model.classifier.weight.detach())
    assert len(opt.param_groups) == 2 and sched.get_last_lr() == [1e-2, 1e-1]


def _loss(params, targets):
    return sum(((p - t) ** 2).sum() for p, t in zip(params, targets, strict=True))


@pytest.mark.parametrize("cls", [LowRankAdam, LowRankAdamW, LowRankSGD])
def test_low_rank_optimizers_keep_rank(cls):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.zeros(7, 5)) for _ in range(2)]
    targets = [torch.randn(7, 5) for _ in params]
    opt = cls(params, rank=2, lr=0.1)
    for _ in range(4):
        opt.zero_grad()
        _loss(params, targets).backward()
        opt.step()
    for p in params:
        s = torch.linalg.svdvals(p.detach().double())
        assert s[1] > 1e-3 and s[2:].max() < 1e-6 * s[0]  # really rank 2 in float32, and not less
    assert _loss(params, targets) < _loss([torch.zeros(7, 5)] * 2, targets)


@pytest.mark.parametrize("cls", [LoTRAdam, LoTRAdamW, LoTRSGD])
def test_lotr_optimizers_keep_tucker_rank(cls):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.zeros(6, 5)) for _ in range(4)]
    targets = [torch.randn(6, 5) for _ in params]
    opt = cls(params, rank=(2, 3), lr=0.1)
    for _ in range(4):
        opt.zero_grad()
        _loss(params, targets).backward()
        opt.step()
    stack = torch.stack([p.detach().double() for p in params]).numpy()
    s_out = torch.linalg.svdvals(torch.from_numpy(tl.unfold(stack, 1)))
    s_in = torch.linalg.svdvals(torch.from_numpy(tl.unfold(stack, 2)))
    assert s_out[1] > 1e-3 and s_out[2:].max() < 1e-6 * s_out[0]
    assert s_in[2] > 1e-3 and s_in[3:].max() < 1e-6 * s_in[0]


def test_optimizer_input_checks():
    with pytest.raises(ValueError, match="2-d parameters"):
        LowRankSGD([torch.nn.Parameter(torch.zeros(3))], rank=1, lr=0.1)
    with pytest.raises(ValueError, match="one shape"):
        LoTRSGD([torch.nn.Parameter(torch.zeros(3, 2)), torch.nn.Parameter(torch.zeros(2, 3))], rank=1, lr=0.1)
    with pytest.raises(ValueError, match="at least one"):
        OptimizerList()


def test_optimizer_list_state_round_trip():
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(4, 3))]
    opt = OptimizerList(torch.optim.Adam([params[0]], lr=0.1), LowRankSGD([params[1]], rank=1, lr=0.1, momentum=0.9))
    _loss(params, [torch.zeros(4, 3)] * 2).backward()
    opt.step()
    state = opt.state_dict()
    other = OptimizerList(torch.optim.Adam([params[0]], lr=0.1), LowRankSGD([params[1]], rank=1, lr=0.1, momentum=0.9))
    other.load_state_dict(state)
    assert other.state_dict()["optimizers"][0]["state"][0]["step"] == 1
