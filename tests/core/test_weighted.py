"""The output-aware Tucker-2 (core/weighted.py): a planted optimum, exactness at full rank, residuals, bad weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from builders import random_lora_factors

from tensorlotr.core import (
    relative_error_lowrank,
    tucker2_lowrank,
    tucker2_weighted,
    weighted_error_lowrank,
    weighted_residuals_lowrank,
)


def _dense_weighted_error(tucker, bs, as_, zs) -> float:
    core, u, v = (np.asarray(x) for x in tucker)
    res = ref = 0.0
    for i, (b, a, z) in enumerate(zip(bs, as_, zs, strict=True)):
        dw = b @ a
        res += np.linalg.norm((dw - u @ core[i] @ v.T) @ z) ** 2
        ref += np.linalg.norm(dw @ z) ** 2
    return float(np.sqrt(res / ref))


def _planted(seed=0, n_layers=5, d=12):
    """Layers ``10 g_l u2 v2^T + h_l u1 v1^T``: v2 lies where the inputs are 100x weaker than along v1.

    The plain rank-1 Tucker keeps the large (u2, v2) part; the output-aware one keeps (u1, v1).
    """
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((d, 2)))
    v1 = np.eye(d)[:, 0]
    v2 = np.eye(d)[:, d - 1]
    scales = np.ones(d)
    scales[d // 2 :] = 0.01  # inputs barely vary along the second half of the coordinates
    zs = [np.diag(scales) @ np.linalg.qr(rng.standard_normal((d, d)))[0] for _ in range(n_layers)]
    bs = [np.stack([10 * rng.uniform(1, 2) * u[:, 1], rng.uniform(1, 2) * u[:, 0]], axis=1) for _ in range(n_layers)]
    as_ = [np.stack([v2, v1]) for _ in range(n_layers)]
    return bs, as_, zs, u[:, 0], v1


def test_planted_weighted_optimum_is_found_where_the_plain_one_differs():
    bs, as_, zs, u1, v1 = _planted()
    plain = tucker2_lowrank(bs, as_, 1)
    weighted = tucker2_weighted(bs, as_, zs, 1, damping=0.0)
    assert abs(float(plain.in_factor[:, 0] @ v1)) < 1e-8  # the plain objective drops the (u1, v1) part
    assert abs(abs(float(weighted.in_factor[:, 0] @ v1)) - 1) < 1e-8
    assert abs(abs(float(weighted.out_factor[:, 0] @ u1)) - 1) < 1e-8
    plain_error, weighted_error = (weighted_error_lowrank(t, bs, as_, zs) for t in (plain, weighted))
    assert weighted_error < 0.15 < 0.9 < plain_error
    assert relative_error_lowrank(weighted, bs, as_) > relative_error_lowrank(plain, bs, as_)  # traded weight error
    assert abs(weighted_error - _dense_weighted_error(weighted, bs, as_, zs)) < 1e-10


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("kind", ["per-layer", "shared", "thin"])
def test_full_rank_is_exact(backend, kind):
    B, A, rng = random_lora_factors(3)
    if kind == "shared":
        zs = rng.standard_normal((11, 11))
    else:
        zs = [rng.standard_normal((11, 3 if kind == "thin" else 11)) for _ in range(len(B))]
    if backend == "torch":
        B, A = torch.tensor(B), torch.tensor(A)
        zs = torch.tensor(zs) if kind == "shared" else [torch.tensor(z) for z in zs]
    tucker = tucker2_weighted(B, A, zs)
    assert tucker.rank == (12, 11)
    assert relative_error_lowrank(tucker, B, A) < 1e-10  # the weights are damped: the weight error is 0 too
    assert weighted_error_lowrank(tucker, B, A, zs) < 1e-10
    assert isinstance(tucker.core, torch.Tensor) == (backend == "torch")


def test_residuals_per_layer_match_the_dense_computation_and_weights_and_energy_work():
    B, A, rng = random_lora_factors(5)
    zs = [rng.standard_normal((11, 6)) for _ in range(len(B))]
    tucker = tucker2_weighted(B, A, zs, (3, 2), scale=[1.0, 2.0, 0.5, 1.5], layer_weights=[1, 1, 1, 5])
    res, ref = weighted_residuals_lowrank(tucker, B, A, zs, scale=[1.0, 2.0, 0.5, 1.5])
    scaled = [s * b for s, b in zip([1.0, 2.0, 0.5, 1.5], B, strict=True)]
    for i in range(len(B)):
        core, u, v = tucker
        dw = scaled[i] @ A[i]
        assert abs(res[i] - np.linalg.norm((dw - u @ core[i] @ v.T) @ zs[i]) ** 2) < 1e-8 * ref[i]
        assert abs(ref[i] - np.linalg.norm(dw @ zs[i]) ** 2) < 1e-8 * ref[i]
    heavy = tucker2_weighted(B, A, zs, (3, 2), scale=[1.0, 2.0, 0.5, 1.5], layer_weights=[1, 1, 1, 50])
    res_heavy, _ = weighted_residuals_lowrank(heavy, B, A, zs, scale=[1.0, 2.0, 0.5, 1.5])
    assert res_heavy[3] / ref[3] < res[3] / ref[3]  # a heavier layer is fitted better
    assert tucker2_weighted(B, A, zs, energy=0.5).rank < (12, 11)


def test_bad_weights_are_refused_clearly():
    B, A, rng = random_lora_factors(1)
    with pytest.raises(ValueError, match="rows but the layers' d_in is 11"):
        tucker2_weighted(B, A, rng.standard_normal((10, 4)), 2)
    with pytest.raises(ValueError, match="weights has 3 layers"):
        tucker2_weighted(B, A, [rng.standard_normal((11, 4))] * 3, 2)
    with pytest.raises(ValueError, match="torch array but the LoRA factors are numpy"):
        tucker2_weighted(B, A, torch.ones(11, 4, dtype=torch.float64), 2)
    bad = rng.standard_normal((11, 4))
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match=r"weights\[0\] contains NaN"):
        tucker2_weighted(B, A, bad, 2)
    with pytest.raises(ValueError, match="all zero"):
        tucker2_weighted(B, A, np.zeros((11, 4)), 2)
    with pytest.raises(ValueError, match="damping must be >= 0"):
        tucker2_weighted(B, A, bad * 0 + 1, 2, damping=-1)
