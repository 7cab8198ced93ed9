"""Cached opt_einsum plans for the contractions of the core.

Each plan is built once per (subscripts, shapes) and reused; the same plan runs on
numpy arrays and torch tensors (opt_einsum picks the backend from the operands).
"""

from __future__ import annotations

import functools
from functools import lru_cache
from typing import Any

import opt_einsum

from .backend import Array

#: dW_l = U G_l V^T: (d_out, r_out), (L, r_out, r_in), (d_in, r_in) -> (L, d_out, d_in)
RECONSTRUCT = "mo,loi,ni->lmn"
#: G_l = U^T dW_l V for a dense stack: (d_out, r_out), (L, d_out, d_in), (d_in, r_in) -> (L, r_out, r_in)
PROJECT_DENSE = "mo,lmn,ni->loi"
#: G_l = U^T B_l A_l V for LoRA factors of equal rank:
#: (d_out, r_out), (L, d_out, r), (L, r, d_in), (d_in, r_in) -> (L, r_out, r_in)
PROJECT_LOWRANK = "mo,lmr,lrn,ni->loi"
#: The same for one layer: (d_out, r_out), (d_out, r), (r, d_in), (d_in, r_in) -> (r_out, r_in)
PROJECT_LOWRANK_LAYER = "mo,mr,rn,ni->oi"
#: ||U G_l V^T||^2 summed over layers, with Gram matrices U^T U and V^T V: (L, o, i), (o, p), (L, p, j), (i, j)
TUCKER_NORM_SQ = "loi,op,lpj,ij->"


@lru_cache(maxsize=256)
def _plan(subscripts: str, shapes: tuple[tuple[int, ...], ...]) -> Any:
    return opt_einsum.contract_expression(subscripts, *shapes, optimize="auto")


def contract(subscripts: str, *operands: Array) -> Array:
    """Evaluate ``subscripts`` on ``operands`` with a plan cached by their shapes."""
    shapes = tuple(tuple(int(n) for n in op.shape) for op in operands)
    return _plan(subscripts, shapes)(*operands)


def plan_cache_info() -> functools._CacheInfo:
    """Hit and miss counts of the plan cache."""
    return _plan.cache_info()
