"""Cached opt_einsum plans (core/contract.py): a contraction plans once and reuses its plan."""

from __future__ import annotations

import numpy as np

import tensorlotr as tlr
from tensorlotr.core import plan_cache_info


def test_contractions_use_cached_plans():
    X = np.random.default_rng(5).standard_normal((3, 6, 5))
    tucker = tlr.tucker2(X, 2)
    before = plan_cache_info()
    tucker.to_dense()
    tucker.to_dense()
    after = plan_cache_info()
    assert after.hits >= before.hits + 1
