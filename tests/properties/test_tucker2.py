"""Hypothesis properties of ``tucker2`` and ``tucker2_lowrank`` on random LoRA stacks, numpy and torch."""

import numpy as np
import pytest
import tensorly as tl
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from tensorly.decomposition import partial_tucker

import tensorlotr as tlr

BACKENDS = ["numpy", "torch"]
DTYPES = ["float32", "float64"]
TOL = {"float32": 2e-4, "float64": 1e-9}


def to_backend(x: np.ndarray, backend: str, dtype: str):
    x = x.astype(dtype)
    return torch.from_numpy(x) if backend == "torch" else x


def to_np(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


@st.composite
def lora_stacks(draw, max_layers=4, max_dim=9, max_rank=3):
    """LoRA factors B (L, d_out, r), A (L, r, d_in) and a per-layer scale."""
    n_layers = draw(st.integers(1, max_layers))
    d_out = draw(st.integers(1, max_dim))
    d_in = draw(st.integers(1, max_dim))
    rank = draw(st.integers(1, max_rank))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    B = rng.standard_normal((n_layers, d_out, rank))
    A = rng.standard_normal((n_layers, rank, d_in))
    scale = rng.uniform(0.5, 2.0, n_layers)
    return B, A, scale


def dense(B, A, scale):
    return np.einsum("l,lmr,lrn->lmn", scale, B, A)


def unfolding_singular_values(X: np.ndarray):
    s_out = np.linalg.svd(tl.unfold(X, 1), compute_uv=False)
    s_in = np.linalg.svd(tl.unfold(X, 2), compute_uv=False)
    return s_out, s_in


def has_gap(s: np.ndarray, k: int) -> bool:
    """A unique leading subspace of dimension k: s_k clearly above s_{k+1}."""
    if k >= len(s):
        return True
    return s[k - 1] - s[k] > 1e-3 * max(s[0], 1e-300)


@pytest.mark.parametrize("backend", BACKENDS)
@given(data=lora_stacks(), rank=st.integers(1, 6))
def test_lowrank_agrees_with_dense(backend, data, rank):
    B, A, scale = data
    X = dense(B, A, scale)
    s_out, s_in = unfolding_singular_values(X)
    assume(has_gap(s_out, rank) and has_gap(s_in, rank))
    fact = tlr.tucker2_lowrank(to_backend(B, backend, "float64"), to_backend(A, backend, "float64"), rank, scale=scale)
    full = tlr.tucker2(to_backend(X, backend, "float64"), rank)
    rec_fact, rec_full = to_np(fact.to_dense()), to_np(full.to_dense())
    assert np.linalg.norm(rec_fact - rec_full) <= 1e-5 * max(np.linalg.norm(X), 1e-300)
    assert fact.rank == full.rank


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@given(data=lora_stacks())
def test_full_rank_is_exact(backend, dtype, data):
    B, A, scale = data
    X = dense(B, A, scale)
    t_dense = tlr.tucker2(to_backend(X, backend, dtype))
    t_fact = tlr.tucker2_lowrank(to_backend(B, backend, dtype), to_backend(A, backend, dtype), scale=scale)
    assert tlr.relative_error(t_dense, to_backend(X, backend, dtype)) < TOL[dtype]
    assert (
        tlr.relative_error_lowrank(t_fact, to_backend(B, backend, dtype), to_backend(A, backend, dtype), scale)
        < TOL[dtype]
    )
    assert t_dense.core.dtype == to_backend(X, backend, dtype).dtype


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@given(data=lora_stacks(), r_out=st.integers(1, 5), r_in=st.integers(1, 5))
def test_hosvd_error_bound(backend, dtype, data, r_out, r_in):
    B, A, scale = data
    X = dense(B, A, scale)
    s_out, s_in = unfolding_singular_values(X)
    bound = np.sqrt(np.sum(s_out[r_out:] ** 2) + np.sum(s_in[r_in:] ** 2))
    for tucker in (
        tlr.tucker2(to_backend(X, backend, dtype), (r_out, r_in)),
        tlr.tucker2_lowrank(to_backend(B, backend, dtype), to_backend(A, backend, dtype), (r_out, r_in), scale=scale),
    ):
        residual = np.linalg.norm(X - to_np(tucker.to_dense()))
        assert residual <= bound + TOL[dtype] * np.linalg.norm(X) + 1e-12


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@given(data=lora_stacks(max_rank=4), rank=st.integers(1, 4), n_iter=st.integers(1, 5))
def test_hooi_never_increases_error(backend, dtype, data, rank, n_iter):
    B, A, scale = data
    X = to_backend(dense(B, A, scale), backend, dtype)
    b, a = to_backend(B, backend, dtype), to_backend(A, backend, dtype)
    slack = 10 * TOL[dtype]
    assert (
        tlr.relative_error(tlr.tucker2(X, rank, n_iter=n_iter), X)
        <= tlr.relative_error(tlr.tucker2(X, rank), X) + slack
    )
    e_hosvd = tlr.relative_error_lowrank(tlr.tucker2_lowrank(b, a, rank, scale=scale), b, a, scale)
    e_hooi = tlr.relative_error_lowrank(tlr.tucker2_lowrank(b, a, rank, scale=scale, n_iter=n_iter), b, a, scale)
    assert e_hooi <= e_hosvd + slack


@pytest.mark.parametrize("backend", BACKENDS)
@given(data=lora_stacks(max_rank=4), rank=st.integers(1, 5))
def test_truncate_matches_direct(backend, data, rank):
    B, A, scale = data
    X = to_backend(dense(B, A, scale), backend, "float64")
    direct = tlr.tucker2(X, rank)
    truncated = tlr.tucker2(X).truncate(rank)
    assert truncated.rank == direct.rank
    assert abs(tlr.relative_error(truncated, X) - tlr.relative_error(direct, X)) <= 1e-6
    fact = tlr.tucker2_lowrank(to_backend(B, backend, "float64"), to_backend(A, backend, "float64"), scale=scale)
    assert abs(tlr.relative_error(fact.truncate(rank), X) - tlr.relative_error(direct, X)) <= 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@given(data=lora_stacks(), rank=st.integers(1, 12), energy=st.sampled_from([None, 0.5, 0.9, 0.999]))
def test_factors_are_orthonormal(backend, dtype, data, rank, energy):
    B, A, scale = data
    X = dense(B, A, scale)
    for tucker in (
        tlr.tucker2(to_backend(X, backend, dtype), rank, energy=energy),
        tlr.tucker2_lowrank(
            to_backend(B, backend, dtype), to_backend(A, backend, dtype), rank, scale=scale, energy=energy
        ),
    ):
        for factor in (to_np(tucker.out_factor), to_np(tucker.in_factor)):
            eye = np.eye(factor.shape[1])
            assert np.abs(factor.T @ factor - eye).max() < 50 * TOL[dtype]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@given(data=lora_stacks(), rank=st.integers(1, 6), zero_layers=st.integers(0, 4))
def test_rank_deficient_and_zero_stacks_are_finite(backend, dtype, data, rank, zero_layers):
    B, A, scale = data
    B = B.copy()
    B[:zero_layers] = 0.0  # PEFT initialises B to zero, so whole checkpoints can be zero
    A = A.copy()
    A[:, 0] = A[:, -1]  # rank-deficient factors
    for tucker in (
        tlr.tucker2(to_backend(dense(B, A, scale), backend, dtype), rank, n_iter=2),
        tlr.tucker2_lowrank(to_backend(B, backend, dtype), to_backend(A, backend, dtype), rank, scale=scale, n_iter=2),
        tlr.tucker2_lowrank(to_backend(B, backend, dtype), to_backend(A, backend, dtype), energy=0.9, scale=scale),
    ):
        for part in tucker:
            assert np.isfinite(to_np(part)).all()
        u = to_np(tucker.out_factor)
        assert np.abs(u.T @ u - np.eye(u.shape[1])).max() < 50 * TOL[dtype]
        assert np.isfinite(tlr.relative_error(tucker, to_backend(dense(B, A, scale), backend, dtype)))


@pytest.mark.parametrize("backend", BACKENDS)
@given(data=lora_stacks(max_dim=8), r_out=st.integers(1, 6), r_in=st.integers(1, 6))
def test_hosvd_matches_tensorly_partial_tucker(backend, data, r_out, r_in):
    B, A, scale = data
    X = dense(B, A, scale)
    L, d_out, d_in = X.shape
    r_out, r_in = min(r_out, d_out, L * d_in), min(r_in, d_in, L * d_out)
    (core, factors), _ = partial_tucker(X, rank=[r_out, r_in], modes=[1, 2], n_iter_max=0)
    ref = tl.tucker_to_tensor((core, [np.eye(L), *factors]))
    ref_error = np.linalg.norm(X - ref) / np.linalg.norm(X)
    ours = tlr.tucker2_lowrank(
        to_backend(B, backend, "float64"), to_backend(A, backend, "float64"), (r_out, r_in), scale=scale
    )
    assert (
        abs(
            tlr.relative_error_lowrank(
                ours, to_backend(B, backend, "float64"), to_backend(A, backend, "float64"), scale
            )
            - ref_error
        )
        < 1e-8
    )
    assert abs(tlr.relative_error(tlr.tucker2(X, (r_out, r_in)), X) - ref_error) < 1e-8


@given(data=lora_stacks(), rank=st.integers(1, 5))
def test_lowrank_error_matches_dense_error(data, rank):
    B, A, scale = data
    tucker = tlr.tucker2_lowrank(B, A, rank, scale=scale)
    assert abs(tlr.relative_error_lowrank(tucker, B, A, scale) - tlr.relative_error(tucker, dense(B, A, scale))) < 1e-9
