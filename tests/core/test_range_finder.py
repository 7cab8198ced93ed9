"""tensorlotr.core.range_finder: the randomized Tucker-2 of a LoRA-factored stack, read in batches of layers.

Each fit is checked against the dense stack it stands for (``dW_l = s_l B_l A_l`` formed here,
never in the code under test) and against the exact factored HOSVD, ``tucker2_lowrank``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tensorlotr.core import FactoredStack, tucker2_lowrank


def lora_stack(
    n_layers: int, d_out: int, d_in: int, ranks: list[int], seed: int, shared: tuple[int, int] | None = None
):
    """LoRA factors of ``n_layers`` layers (ranks cycled from ``ranks``), float64; ``shared`` plants a common basis."""
    rng = np.random.default_rng(seed)
    if shared:
        u0 = np.linalg.qr(rng.standard_normal((d_out, shared[0])))[0]
        v0 = np.linalg.qr(rng.standard_normal((d_in, shared[1])))[0]
    bs, as_ = [], []
    for i in range(n_layers):
        r = ranks[i % len(ranks)]
        if shared:
            bs.append(u0 @ rng.standard_normal((shared[0], r)))
            as_.append(rng.standard_normal((r, shared[1])) @ v0.T)
        else:
            bs.append(rng.standard_normal((d_out, r)))
            as_.append(rng.standard_normal((r, d_in)) / np.sqrt(d_in))
    scales = list(rng.uniform(0.5, 2.0, n_layers))
    return bs, as_, scales


def dense(bs, as_, scales) -> np.ndarray:
    return np.stack(
        [s * (np.asarray(b, np.float64) @ np.asarray(a, np.float64)) for b, a, s in zip(bs, as_, scales, strict=True)]
    )


def layer_residuals(t, stack: np.ndarray) -> np.ndarray:
    """``||dW_l - U G_l V^T||^2`` per layer of the Tucker-2 ``t``, from the dense stack."""
    u, v = np.asarray(t.out_factor, np.float64), np.asarray(t.in_factor, np.float64)
    approx = np.einsum("or,lrs,is->loi", u, np.asarray(t.core, np.float64), v)
    return ((stack - approx) ** 2).sum(axis=(1, 2))


def test_full_sketch_is_the_exact_hosvd():
    """With the sketch as wide as the space, the basis is the identity and the fit is the HOSVD's."""
    bs, as_, scales = lora_stack(10, 24, 18, [3, 5], seed=1)
    fit = FactoredStack(bs, as_, scales).tucker2((6, 4), oversample=64)
    exact = tucker2_lowrank(bs, as_, (6, 4), scale=scales)
    assert fit.route == "exact Gram"
    stack = dense(bs, as_, scales)
    ours = layer_residuals(fit.tucker, stack)
    theirs = layer_residuals(exact, stack)
    np.testing.assert_allclose(ours, theirs, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(fit.residual_sq, ours, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(fit.norm_sq, (stack**2).sum(axis=(1, 2)), rtol=1e-12)


@settings(max_examples=25, deadline=None)
@given(
    n_layers=st.integers(1, 12),
    d_out=st.integers(2, 20),
    d_in=st.integers(2, 20),
    ranks=st.lists(st.integers(1, 4), min_size=1, max_size=3),
    rank=st.tuples(st.integers(1, 8), st.integers(1, 8)),
    oversample=st.integers(0, 6),
    n_power=st.integers(0, 2),
    batch_columns=st.integers(1, 16),
    seed=st.integers(0, 2**16),
)
def test_reported_errors_are_the_true_errors(
    n_layers, d_out, d_in, ranks, rank, oversample, n_power, batch_columns, seed
):
    """Whatever the sketch: orthonormal factors, cores ``U^T dW_l V``, and each reported error exact."""
    bs, as_, scales = lora_stack(n_layers, d_out, d_in, ranks, seed)
    fit = FactoredStack(bs, as_, scales, batch_columns=batch_columns).tucker2(
        rank, oversample=oversample, n_power=n_power, seed=seed
    )
    t = fit.tucker
    u, v = np.asarray(t.out_factor), np.asarray(t.in_factor)
    r_out, r_in = t.rank
    assert r_out == min(rank[0], d_out, n_layers * d_in) and r_in == min(rank[1], d_in, n_layers * d_out)
    np.testing.assert_allclose(u.T @ u, np.eye(r_out), atol=1e-10)
    np.testing.assert_allclose(v.T @ v, np.eye(r_in), atol=1e-10)
    stack = dense(bs, as_, scales)
    np.testing.assert_allclose(np.asarray(t.core), np.einsum("or,loi,is->lrs", u, stack, v), atol=1e-10)
    energy = (stack**2).sum()
    np.testing.assert_allclose(fit.residual_sq, layer_residuals(fit.tucker, stack), rtol=1e-6, atol=1e-10 * energy)
    np.testing.assert_allclose(fit.norm_sq, (stack**2).sum(axis=(1, 2)), rtol=1e-10)


def test_a_planted_shared_basis_is_found_in_batches_of_mixed_ranks():
    """Layers of ranks 2 and 3 inside a (5, 4) basis, in batches of 7 columns: the fit at (5, 4) is exact."""
    bs, as_, scales = lora_stack(30, 60, 50, [2, 3], seed=3, shared=(5, 4))
    stack_ = FactoredStack(bs, as_, scales, batch_columns=7)
    assert len(stack_.runs) > 5
    fit = stack_.tucker2((5, 4), oversample=3)
    assert fit.route.startswith("randomized")
    assert fit.residual_sq.sum() <= 1e-20 * fit.norm_sq.sum()
    assert layer_residuals(fit.tucker, dense(bs, as_, scales)).sum() <= 1e-18 * fit.norm_sq.sum()


def test_randomized_error_is_within_one_percent_of_the_exact_hosvd():
    """A zoo-like stack (60 layers of rank 8, 256 x 192, a decaying shared spectrum plus noise) at rank 32."""
    rng = np.random.default_rng(4)
    d_out, d_in, n_layers, r = 256, 192, 60, 8
    decay_out, decay_in = np.exp(-np.arange(d_out) / 20), np.exp(-np.arange(d_in) / 15)
    q_out = np.linalg.qr(rng.standard_normal((d_out, d_out)))[0] * decay_out
    q_in = np.linalg.qr(rng.standard_normal((d_in, d_in)))[0] * decay_in
    bs = [q_out @ rng.standard_normal((d_out, r)) for _ in range(n_layers)]
    as_ = [rng.standard_normal((r, d_in)) @ q_in.T for _ in range(n_layers)]
    exact = tucker2_lowrank(bs, as_, 32)
    stack = dense(bs, as_, [1.0] * n_layers)
    exact_error = np.sqrt(layer_residuals(exact, stack).sum())
    fit = FactoredStack([torch.tensor(b, dtype=torch.float32) for b in bs], [torch.tensor(a) for a in as_]).tucker2(32)
    assert np.sqrt(fit.residual_sq.sum()) <= 1.01 * exact_error


def test_layer_weights_pull_the_basis_and_cores_keep_each_layer_exact():
    """Weight 0 on layers outside a planted basis: the basis fits the weighted layers exactly."""
    inside = lora_stack(8, 30, 20, [2], seed=5, shared=(3, 3))
    outside = lora_stack(4, 30, 20, [2], seed=6)
    bs, as_, scales = (inside[i] + outside[i] for i in range(3))
    weights = [1.0] * 8 + [0.0] * 4
    fit = FactoredStack(bs, as_, scales).tucker2((3, 3), layer_weights=weights, oversample=4)
    assert fit.residual_sq[:8].sum() <= 1e-20 * fit.norm_sq[:8].sum()
    assert fit.residual_sq[8:].sum() > 0.1 * fit.norm_sq[8:].sum()
    unweighted = FactoredStack(bs, as_, scales).tucker2((3, 3), oversample=4)
    assert unweighted.residual_sq[:8].sum() > 1e-6 * fit.norm_sq[:8].sum()


def test_bfloat16_factors_are_read_in_float32_batches():
    """Factors stored in bfloat16 stay so; the fit is float32 and matches the fit of their float32 copies."""
    bs, as_, scales = lora_stack(12, 40, 32, [4], seed=7)
    b16 = [torch.tensor(b, dtype=torch.bfloat16) for b in bs]
    a16 = [torch.tensor(a, dtype=torch.bfloat16) for a in as_]
    fit16 = FactoredStack(b16, a16, scales).tucker2(6)
    fit32 = FactoredStack([b.float() for b in b16], [a.float() for a in a16], scales).tucker2(6)
    assert b16[0].dtype == torch.bfloat16 and fit16.tucker.core.dtype == torch.float32
    np.testing.assert_allclose(fit16.residual_sq, fit32.residual_sq, rtol=1e-4)


def test_cancelled_errors_are_recomputed_from_the_factors():
    """A stack fitted at its exact rank: ``||dW||^2 - ||G||^2`` cancels, and the reported error is round-off sized."""
    bs, as_, scales = lora_stack(6, 16, 12, [2], seed=8, shared=(3, 3))
    fit = FactoredStack(bs, as_, scales).tucker2(3, oversample=2)
    truth = layer_residuals(fit.tucker, dense(bs, as_, scales))
    assert (fit.residual_sq <= 1e-24 * fit.norm_sq.sum()).all() and (truth <= 1e-24 * fit.norm_sq.sum()).all()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda bs, as_: bs.__setitem__(2, bs[2] * np.nan), r"B\[2\] contains NaN or Inf"),
        (lambda bs, as_: as_.__setitem__(4, as_[4] * np.inf), r"A\[4\] contains NaN or Inf"),
    ],
)
def test_non_finite_factors_name_the_layer(change, message):
    bs, as_, scales = lora_stack(6, 8, 8, [2], seed=9)
    change(bs, as_)
    with pytest.raises(ValueError, match=message):
        FactoredStack(bs, as_, scales, batch_columns=4).tucker2(2)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rank": 0}, "rank must be positive"),
        ({"rank": 2, "oversample": -1}, "oversample"),
        ({"rank": 2, "layer_weights": [1.0, -1.0, 1.0]}, "layer_weights must be >= 0"),
        ({"rank": 2, "layer_weights": [1.0, 1.0]}, "weights"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, message):
    bs, as_, scales = lora_stack(3, 8, 8, [2], seed=10)
    with pytest.raises(ValueError, match=message):
        FactoredStack(bs, as_, scales).tucker2(**kwargs)


def test_float32_errors_near_the_noise_floor_are_rechecked_exactly():
    """float32 factors 1% off a planted basis (residual ~1e-4 of the energy, where float32 Grams cancel): the
    reported errors are the true ones to 1%, in chunks of layers."""
    bs, as_, scales = lora_stack(40, 48, 40, [3], seed=11, shared=(4, 4))
    rng = np.random.default_rng(12)
    bs = [b + 0.01 * np.abs(b).mean() * rng.standard_normal(b.shape) for b in bs]
    b32 = [torch.tensor(b, dtype=torch.float32) for b in bs]
    a32 = [torch.tensor(a, dtype=torch.float32) for a in as_]
    fit = FactoredStack(b32, a32, scales, batch_columns=12).tucker2(4, oversample=4)
    truth = layer_residuals(fit.tucker, dense(b32, a32, scales))
    assert (truth < 1e-3 * fit.norm_sq).all() and (truth > 1e-7 * fit.norm_sq).all()
    np.testing.assert_allclose(fit.residual_sq, truth, rtol=1e-2)
