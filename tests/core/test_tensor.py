"""The Tucker-2 tensor (core/tensor.py): its norm and its unpacking into (core, U, V)."""

from __future__ import annotations

import numpy as np
import torch

import tensorlotr as tlr


def test_norm_and_unpacking():
    X = np.random.default_rng(4).standard_normal((3, 5, 4))
    tucker = tlr.tucker2(X)
    core, _u, _v = tucker
    assert core.shape == (3, 5, 4)
    assert abs(tucker.norm() - np.linalg.norm(X)) < 1e-10
    t = torch.from_numpy(X)
    assert abs(tlr.tucker2(t).norm() - np.linalg.norm(X)) < 1e-10
