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

from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

import torch

from ..core import normalize_rank, tucker2


@torch.no_grad()
def project_low_rank(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    """Best rank-``rank`` approximation of ``matrix`` (d_out, d_in), by truncated SVD.

    Computed in float64; the result is (d_out, d_in) in ``matrix``'s dtype.

    Examples
    --------
    >>> import torch
    >>> projected = project_low_rank(torch.randn(6, 5), rank=2)
    >>> tuple(projected.shape), int(torch.linalg.matrix_rank(projected))
    ((6, 5), 2)
    """
    u, s, vh = torch.linalg.svd(matrix.to(torch.float64), full_matrices=False)
    r = min(rank, s.shape[0])
    projected: torch.Tensor = (u[:, :r] * s[:r]) @ vh[:r]
    return projected.to(matrix.dtype)


@torch.no_grad()
def project_tucker2(matrices: list[torch.Tensor], rank: tuple[int, int]) -> list[torch.Tensor]:
    """Tucker-2 projection of the stack of ``matrices`` (each d_out x d_in) at ``rank``.

    The L matrices become ``U G_l V^T`` with ``U`` (d_out, r_out) and ``V`` (d_in, r_in)
    shared, by the HOSVD of :func:`tensorlotr.tucker2`; ``rank`` is ``(r_out, r_in)`` or an int.

    Examples
    --------
    >>> import torch
    >>> projected = project_tucker2([torch.randn(6, 5) for _ in range(3)], rank=(2, 3))
    >>> mode1 = torch.cat(projected, dim=1)                 # (d_out, L*d_in): spans U
    >>> mode2 = torch.cat([p.T for p in projected], dim=1)  # (d_in, L*d_out): spans V
    >>> int(torch.linalg.matrix_rank(mode1)), int(torch.linalg.matrix_rank(mode2))
    (2, 3)
    """
    stack = torch.stack([m.to(torch.float64) for m in matrices])
    dense = tucker2(stack, rank).to_dense()
    return [dense[i].to(m.dtype) for i, m in enumerate(matrices)]


class _LowRankProjection:
    """Mixin: after the base optimizer's step, project each 2-d parameter onto rank ``r``."""

    # set by the torch optimizer this is mixed into
    defaults: dict[str, Any]
    param_groups: list[dict[str, Any]]

    def _init_rank(self, rank: int) -> None:
        rank = normalize_rank(rank)[0]  # type: ignore[index]
        self.defaults["rank"] = rank
        for group in self.param_groups:
            group.setdefault("rank", rank)
            for p in group["params"]:
                if p.dim() != 2:
                    raise ValueError(f"low-rank optimizers take 2-d parameters, got shape {tuple(p.shape)}")

    def step(self, closure: Any = None) -> Any:
        loss = super().step(closure)  # type: ignore[misc]
        with torch.no_grad():
            for group in self.param_groups:
                for p in group["params"]:
                    p.copy_(project_low_rank(p, group["rank"]))
        return loss


class _TuckerProjection:
    """Mixin: after the base optimizer's step, project each param group's stack onto Tucker-2 rank."""

    # set by the torch optimizer this is mixed into
    defaults: dict[str, Any]
    param_groups: list[dict[str, Any]]

    def _init_rank(self, rank: int | tuple[int, int]) -> None:
        pair = normalize_rank(rank)
        self.defaults["rank"] = pair
        for group in self.param_groups:
            group["rank"] = normalize_rank(group.get("rank", pair))
            shapes = {tuple(p.shape) for p in group["params"]}
            if len(shapes) != 1 or len(next(iter(shapes))) != 2:
                raise ValueError(f"a LoTR param group must hold 2-d parameters of one shape, got {sorted(shapes)}")

    def step(self, closure: Any = None) -> Any:
        loss = super().step(closure)  # type: ignore[misc]
        with torch.no_grad():
            for group in self.param_groups:
                for p, projected in zip(group["params"], project_tucker2(group["params"], group["rank"]), strict=True):
                    p.copy_(projected)
        return loss


def _make(base: type[torch.optim.Optimizer], mixin: type, name: str, doc: str) -> type:
    def init(self: Any, params: Iterable[Any], rank: Any, **kwargs: Any) -> None:
        base.__init__(self, params, **kwargs)
        self._init_rank(rank)

    return type(name, (mixin, base), {"__init__": init, "__doc__": doc, "__module__": __name__})


_LR_DOC = """{base} on full matrices, each projected back onto rank ``rank`` after every step.

Every parameter is one matrix (d_out, d_in); after ``step()`` it is its best rank-``rank``
approximation (truncated SVD). A param group's own ``"rank"`` overrides ``rank``; the other
keyword arguments go to ``torch.optim.{base}``.

Examples
--------
>>> import torch
>>> from tensorlotr.optim import LowRank{base}
>>> weight = torch.nn.Parameter(torch.randn(6, 5))
>>> optimizer = LowRank{base}([weight], rank=2, lr=1e-2)
>>> weight.sum().backward()
>>> optimizer.step()
>>> int(torch.linalg.matrix_rank(weight.detach()))
2
"""
_LOTR_DOC = """{base} on a stack of matrices per param group, projected onto Tucker-2 rank ``rank`` after every step.

Each param group holds L matrices of one shape (d_out, d_in), a stack (L, d_out, d_in);
after ``step()`` they are ``U G_l V^T`` with ``U`` (d_out, r_out) and ``V`` (d_in, r_in)
shared, the HOSVD projection at ``rank = (r_out, r_in)`` (an int for both). A param
group's own ``"rank"`` overrides ``rank``; the other keyword arguments go to ``torch.optim.{base}``.

Examples
--------
>>> import torch
>>> from tensorlotr.optim import LoTR{base}
>>> stack = [torch.nn.Parameter(torch.randn(6, 5)) for _ in range(3)]
>>> optimizer = LoTR{base}([dict(params=stack)], rank=(2, 3), lr=1e-2)
>>> sum(w.sum() for w in stack).backward()
>>> optimizer.step()
>>> mode1 = torch.cat([w.detach() for w in stack], dim=1)     # (d_out, L*d_in): spans U
>>> mode2 = torch.cat([w.detach().T for w in stack], dim=1)   # (d_in, L*d_out): spans V
>>> int(torch.linalg.matrix_rank(mode1)), int(torch.linalg.matrix_rank(mode2))
(2, 3)
"""

LowRankAdam = _make(torch.optim.Adam, _LowRankProjection, "LowRankAdam", _LR_DOC.format(base="Adam"))
LowRankAdamW = _make(torch.optim.AdamW, _LowRankProjection, "LowRankAdamW", _LR_DOC.format(base="AdamW"))
LowRankSGD = _make(torch.optim.SGD, _LowRankProjection, "LowRankSGD", _LR_DOC.format(base="SGD"))
LoTRAdam = _make(torch.optim.Adam, _TuckerProjection, "LoTRAdam", _LOTR_DOC.format(base="Adam"))
LoTRAdamW = _make(torch.optim.AdamW, _TuckerProjection, "LoTRAdamW", _LOTR_DOC.format(base="AdamW"))
LoTRSGD = _make(torch.optim.SGD, _TuckerProjection, "LoTRSGD", _LOTR_DOC.format(base="SGD"))


class OptimizerList(torch.optim.Optimizer):
    """Several optimizers stepped as one; ``param_groups`` is the concatenation of theirs.

    For ``transformers.Trainer(optimizers=(OptimizerList(...), LRSchedulerList(...)))``:
    say a plain optimizer for the head and a projected one for the full corrections.

    Examples
    --------
    >>> import torch
    >>> head, correction = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(6, 5))
    >>> optimizer = OptimizerList(torch.optim.SGD([head], lr=0.1), LowRankSGD([correction], rank=2, lr=0.1))
    >>> optimizer, len(optimizer.param_groups)
    (OptimizerList(SGD, LowRankSGD), 2)
    """

    def __init__(self, *optimizers: torch.optim.Optimizer) -> None:
        if not optimizers:
            raise ValueError("OptimizerList needs at least one optimizer")
        # Optimizer.__init__ would register the parameters a second time; set its fields directly.
        self.optimizers = list(optimizers)
        self.defaults = {}
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return [group for opt in self.optimizers for group in opt.param_groups]

    @property
    def state(self) -> dict[Any, Any]:  # type: ignore[override]
        merged: dict[Any, Any] = {}
        for opt in self.optimizers:
            merged.update(opt.state)
        return merged

    def step(self, closure: Any = None) -> Any:
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

    def state_dict(self) -> dict[str, Any]:
        return {"optimizers": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
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
    """Several learning-rate schedulers stepped as one (one per optimizer of an ``OptimizerList``).

    Examples
    --------
    >>> import torch
    >>> a, b = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(6, 5))
    >>> optimizer = OptimizerList(torch.optim.SGD([a], lr=0.1), LowRankSGD([b], rank=2, lr=0.1))
    >>> halve = [torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5) for o in optimizer.optimizers]
    >>> schedule = LRSchedulerList(*halve)
    >>> optimizer.step()
    >>> schedule.step()
    >>> schedule.get_last_lr()
    [0.05, 0.05]
    """

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
