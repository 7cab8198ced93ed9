"""Optimizers that keep full correction matrices on a low-rank or Tucker-2 manifold.

``LowRank*`` optimizers step each 2-d parameter as usual, then replace it by its best
rank-``r`` approximation (truncated SVD). ``LoTR*`` optimizers treat all parameters of a
param group as one stack ``(L, d_out, d_in)`` and replace it by its Tucker-2 projection of
rank ``(r_out, r_in)``: ``U G_l V^T`` with ``G_l = U^T W_l V`` (the HOSVD of
:func:`tensorlotr.tucker2`). After ``step()`` the parameters really have that rank.

``OptimizerList`` and ``LRSchedulerList`` combine several into one, for
``transformers.Trainer(optimizers=(opt, sched))``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from .core import normalize_rank, tucker2


@torch.no_grad()
def project_low_rank(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    """Best rank-``rank`` approximation of ``matrix`` (d_out, d_in), by truncated SVD."""
    u, s, vh = torch.linalg.svd(matrix.to(torch.float64), full_matrices=False)
    r = min(rank, s.shape[0])
    return ((u[:, :r] * s[:r]) @ vh[:r]).to(matrix.dtype)


@torch.no_grad()
def project_tucker2(matrices: list[torch.Tensor], rank: tuple[int, int]) -> list[torch.Tensor]:
    """Tucker-2 projection of the stack of ``matrices`` (each d_out x d_in) at ``rank``."""
    stack = torch.stack([m.to(torch.float64) for m in matrices])
    dense = tucker2(stack, rank).to_dense()
    return [dense[i].to(m.dtype) for i, m in enumerate(matrices)]


class _LowRankProjection:
    """Mixin: after the base optimizer's step, project each 2-d parameter onto rank ``r``."""

    def _init_rank(self, rank: int) -> None:
        rank = normalize_rank(rank)[0]  # type: ignore[index]
        self.defaults["rank"] = rank
        for group in self.param_groups:  # type: ignore[attr-defined]
            group.setdefault("rank", rank)
            for p in group["params"]:
                if p.dim() != 2:
                    raise ValueError(f"low-rank optimizers take 2-d parameters, got shape {tuple(p.shape)}")

    def step(self, closure: Any = None) -> Any:
        loss = super().step(closure)  # type: ignore[misc]
        with torch.no_grad():
            for group in self.param_groups:  # type: ignore[attr-defined]
                for p in group["params"]:
                    p.copy_(project_low_rank(p, group["rank"]))
        return loss


class _TuckerProjection:
    """Mixin: after the base optimizer's step, project each param group's stack onto Tucker-2 rank."""

    def _init_rank(self, rank: int | tuple[int, int]) -> None:
        pair = normalize_rank(rank)
        self.defaults["rank"] = pair
        for group in self.param_groups:  # type: ignore[attr-defined]
            group["rank"] = normalize_rank(group.get("rank", pair))
            shapes = {tuple(p.shape) for p in group["params"]}
            if len(shapes) != 1 or len(next(iter(shapes))) != 2:
                raise ValueError(f"a LoTR param group must hold 2-d parameters of one shape, got {sorted(shapes)}")

    def step(self, closure: Any = None) -> Any:
        loss = super().step(closure)  # type: ignore[misc]
        with torch.no_grad():
            for group in self.param_groups:  # type: ignore[attr-defined]
                for p, projected in zip(group["params"], project_tucker2(group["params"], group["rank"]), strict=True):
                    p.copy_(projected)
        return loss


def _make(base: type[torch.optim.Optimizer], mixin: type, name: str, doc: str) -> type:
    def init(self: Any, params: Iterable[Any], rank: Any, **kwargs: Any) -> None:
        base.__init__(self, params, **kwargs)
        self._init_rank(rank)

    return type(name, (mixin, base), {"__init__": init, "__doc__": doc, "__module__": __name__})


_LR_DOC = "{base} on full matrices, each projected back onto rank ``rank`` after every step."
_LOTR_DOC = "{base} on a stack of matrices per param group, projected onto Tucker-2 rank ``rank`` after every step."

LowRankAdam = _make(torch.optim.Adam, _LowRankProjection, "LowRankAdam", _LR_DOC.format(base="Adam"))
LowRankAdamW = _make(torch.optim.AdamW, _LowRankProjection, "LowRankAdamW", _LR_DOC.format(base="AdamW"))
LowRankSGD = _make(torch.optim.SGD, _LowRankProjection, "LowRankSGD", _LR_DOC.format(base="SGD"))
LoTRAdam = _make(torch.optim.Adam, _TuckerProjection, "LoTRAdam", _LOTR_DOC.format(base="Adam"))
LoTRAdamW = _make(torch.optim.AdamW, _TuckerProjection, "LoTRAdamW", _LOTR_DOC.format(base="AdamW"))
LoTRSGD = _make(torch.optim.SGD, _TuckerProjection, "LoTRSGD", _LOTR_DOC.format(base="SGD"))


class OptimizerList(torch.optim.Optimizer):
    """Several optimizers stepped as one; ``param_groups`` is the concatenation of theirs."""

    def __init__(self, *optimizers: torch.optim.Optimizer) -> None:
        if not optimizers:
            raise ValueError("OptimizerList needs at least one optimizer")
        # Optimizer.__init__ would register the parameters a second time; set its fields directly.
        self.optimizers = list(optimizers)
        self.defaults = {}
        self._optimizer_step_pre_hooks = {}
        self._optimizer_step_post_hooks = {}
        self._optimizer_state_dict_pre_hooks = {}
        self._optimizer_state_dict_post_hooks = {}
        self._optimizer_load_state_dict_pre_hooks = {}
        self._optimizer_load_state_dict_post_hooks = {}

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return [group for opt in self.optimizers for group in opt.param_groups]

    @property
    def state(self) -> dict[Any, Any]:  # type: ignore[override]
        merged: dict[Any, Any] = {}
        for opt in self.optimizers:
            merged.update(opt.state)
        return merged

    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for opt in self.optimizers:
            opt.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        return {"optimizers": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        states = state_dict["optimizers"]
        if len(states) != len(self.optimizers):
            raise ValueError(f"state holds {len(states)} optimizers, this list has {len(self.optimizers)}")
        for opt, state in zip(self.optimizers, states, strict=True):
            opt.load_state_dict(state)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        raise NotImplementedError("add the param group to one of the optimizers in the list")

    def __repr__(self) -> str:
        return f"OptimizerList({', '.join(type(o).__name__ for o in self.optimizers)})"


class LRSchedulerList:
    """Several learning-rate schedulers stepped as one (one per optimizer of an ``OptimizerList``)."""

    def __init__(self, *schedulers: Any) -> None:
        if not schedulers:
            raise ValueError("LRSchedulerList needs at least one scheduler")
        self.schedulers = list(schedulers)

    def step(self, *args: Any, **kwargs: Any) -> None:
        for scheduler in self.schedulers:
            scheduler.step(*args, **kwargs)

    def get_last_lr(self) -> list[float]:
        return [lr for scheduler in self.schedulers for lr in scheduler.get_last_lr()]

    def state_dict(self) -> dict[str, Any]:
        return {"schedulers": [s.state_dict() for s in self.schedulers]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for scheduler, state in zip(self.schedulers, state_dict["schedulers"], strict=True):
            scheduler.load_state_dict(state)


__all__ = [
    "LRSchedulerList",
    "LoTRAdam",
    "LoTRAdamW",
    "LoTRSGD",
    "LowRankAdam",
    "LowRankAdamW",
    "LowRankSGD",
    "OptimizerList",
    "project_low_rank",
    "project_tucker2",
]
