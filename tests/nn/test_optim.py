"""The projected optimizers and optimizer lists (nn/optim.py), alone and in transformers.Trainer."""

from __future__ import annotations

import pytest
import tensorly as tl
import torch
from builders import TokenDataset, tiny_bert, training_args
from transformers import Trainer

import tensorlotr as tlr
from tensorlotr.nn.optim import (
    LoTRAdam,
    LoTRAdamW,
    LoTRSGD,
    LowRankAdam,
    LowRankAdamW,
    LowRankSGD,
    LRSchedulerList,
    OptimizerList,
)


def test_trainer_with_optimizer_list(tmp_path):
    lotr = tlr.get_lotr_model(
        tiny_bert(), tlr.LoTRConfig(rank=4, target_modules=["query"], modules_to_save=["classifier"])
    )
    factors = [p for n, p in lotr.named_parameters() if p.requires_grad and "lotr_" in n]
    head = list(lotr.base_model.classifier.parameters())
    opt = OptimizerList(torch.optim.AdamW(factors, lr=1e-2), torch.optim.SGD(head, lr=1e-1))
    sched = LRSchedulerList(*(torch.optim.lr_scheduler.LambdaLR(o, lambda step: 1.0) for o in opt.optimizers))
    head_before = lotr.base_model.classifier.weight.detach().clone()
    trainer = Trainer(model=lotr, args=training_args(tmp_path), train_dataset=TokenDataset(), optimizers=(opt, sched))
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
