"""``tucker2`` and ``tucker2_lowrank`` (core/hosvd.py): fixed cases, bad input, and a plain reference.

The reference below is the factored HOSVD/HOOI written the obvious way in numpy float64:
a thin QR per layer, the blocks concatenated, a reduced QR of the tall result with ``Q``
formed, the SVD of its triangle with tensorly's sign rule, and ``Q`` times the kept
columns. The core's batched, R-only, Householder version must agree to 1e-10.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorly as tl
import torch

import tensorlotr as tlr

TOL = 1e-10


# --- fixed cases -------------------------------------------------------------------------------


def test_all_zero_stack():
    B = np.zeros((3, 6, 2))
    A = np.zeros((3, 2, 5))
    tucker = tlr.tucker2_lowrank(B, A, 4)
    assert tucker.rank == (4, 4)
    assert np.all(tucker.core == 0)
    assert tlr.relative_error_lowrank(tucker, B, A) == 0.0
    assert tlr.relative_error(tlr.tucker2(np.zeros((3, 6, 5)), 2), np.zeros((3, 6, 5))) == 0.0
    assert tlr.tucker2_lowrank(B, A, energy=0.9).rank == (1, 1)


def test_per_layer_ranks_and_scales():
    rng = np.random.default_rng(1)
    ranks, scales = [2, 4, 3], [0.5, 2.0, 1.0]
    Bs = [rng.standard_normal((10, r)) for r in ranks]
    As = [rng.standard_normal((r, 7)) for r in ranks]
    X = np.stack([s * b @ a for s, b, a in zip(scales, Bs, As, strict=False)])
    tucker = tlr.tucker2_lowrank(Bs, As, scale=scales)
    assert tucker.rank == (9, 7)  # (min(d_out=10, sum r_l=9), min(d_in=7, 9))
    assert tlr.relative_error(tucker, X) < 1e-12
    trunc = tlr.tucker2_lowrank(Bs, As, (4, 3), scale=scales)
    assert abs(tlr.relative_error(trunc, X) - tlr.relative_error(tlr.tucker2(X, (4, 3)), X)) < 1e-10


def test_energy_rule():
    rng = np.random.default_rng(2)
    X = rng.standard_normal((4, 12, 10)) * np.logspace(0, -3, 10)
    tucker = tlr.tucker2(X, energy=0.99)
    s_out = np.linalg.svd(tl.unfold(X, 1), compute_uv=False)
    s_in = np.linalg.svd(tl.unfold(X, 2), compute_uv=False)
    for s, r in ((s_out, tucker.rank[0]), (s_in, tucker.rank[1])):
        sq = s**2
        assert sq[r:].sum() <= 0.01 * sq.sum() * (1 + 1e-9)
        assert sq[r - 1 :].sum() > 0.01 * sq.sum()
    assert tlr.tucker2(X, 2, energy=0.99).rank == (2, 2)  # rank caps energy


def test_rank_is_clipped_and_documented_shapes():
    X = np.random.default_rng(3).standard_normal((2, 3, 20))
    tucker = tlr.tucker2(X, 50)
    assert tucker.rank == (3, 6)  # min(d_out, L*d_in), min(d_in, L*d_out)
    assert tucker.shape == (2, 3, 20)
    assert tlr.relative_error(tucker, X) < 1e-12
    assert tucker.n_params == 3 * 3 + 20 * 6 + 2 * 3 * 6


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: tlr.tucker2(np.zeros((3, 4))), "3 dimensions"),
        (lambda: tlr.tucker2(np.zeros((2, 3, 4)), 0), "rank must be positive"),
        (lambda: tlr.tucker2(np.zeros((2, 3, 4)), (2, -1)), "rank must be positive"),
        (lambda: tlr.tucker2(np.full((2, 3, 4), np.nan)), "NaN or Inf"),
        (lambda: tlr.tucker2(np.zeros((2, 3, 4)), energy=1.5), "energy"),
        (lambda: tlr.tucker2(np.zeros((2, 3, 4)), n_iter=-1), "n_iter"),
        (lambda: tlr.tucker2_lowrank(np.zeros((3, 4, 2)), np.zeros((2, 2, 5))), "B has 3 layers but A has 2"),
        (lambda: tlr.tucker2_lowrank(np.zeros((3, 4, 2)), np.zeros((3, 3, 5))), "rank 2 but A has rank 3"),
        (lambda: tlr.tucker2_lowrank(np.zeros((4, 2)), np.zeros((2, 5))), "3 dimensions"),
        (lambda: tlr.tucker2_lowrank([np.ones((4, 2))], [np.full((2, 5), np.inf)]), r"A\[0\] contains NaN"),
        (lambda: tlr.tucker2_lowrank([np.ones((4, 2)), np.ones((5, 2))], [np.ones((2, 5))] * 2), "do not match"),
        (lambda: tlr.tucker2_lowrank(np.ones((2, 4, 2)), np.ones((2, 2, 5)), scale=[1.0]), "scale has 1 values"),
        (lambda: tlr.Tucker2(np.zeros((2, 3, 4)), np.zeros((5, 2)), np.zeros((6, 4))), "do not match the core"),
    ],
)
def test_bad_input_raises_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# --- the factored HOSVD/HOOI against a plain transcription ---------------------------------------


def ref_left(matrix: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Leading ``rank`` left singular vectors of ``matrix`` (d, k) and all its singular values."""
    q = None
    if matrix.shape[0] > 2 * matrix.shape[1]:
        q, matrix = np.linalg.qr(matrix)
    u, s, _ = np.linalg.svd(matrix, full_matrices=False)
    u = u * np.sign(u[np.argmax(np.abs(u), axis=0), np.arange(u.shape[1])])
    u = u[:, :rank]
    return (u if q is None else q @ u), s


def ref_compress(lefts: list[np.ndarray], rights: list[np.ndarray], scales: list[float]) -> np.ndarray:
    """``[s_l lefts_l T_l^T]_l`` with ``rights_l^T = Q_l T_l``."""
    return np.concatenate(
        [left @ (np.linalg.qr(right.T)[1] * s).T for left, right, s in zip(lefts, rights, scales, strict=True)], axis=1
    )


def ref_energy_rank(s: np.ndarray, energy: float) -> int:
    sq = s**2
    for k in range(1, len(sq) + 1):
        if sq[k:].sum() <= (1 - energy) * sq.sum() * (1 + 1e-12):
            return k
    return len(sq)


def ref_tucker2_lowrank(bs, as_, scales, rank, energy=None, n_iter=0, tol=1e-10):
    """``(core, U, V)`` of ``dW_l = s_l B_l A_l``, the factored HOSVD then HOOI, written plainly."""
    a_ts, b_ts = [a.T for a in as_], [b.T for b in bs]

    def cores(u, v):
        return np.stack([s * (u.T @ b) @ (a @ v) for b, a, s in zip(bs, as_, scales, strict=True)])

    u, s_out = ref_left(ref_compress(bs, as_, scales), rank[0])
    v, s_in = ref_left(ref_compress(a_ts, b_ts, scales), rank[1])
    if energy is not None:
        r_out, r_in = min(ref_energy_rank(s_out, energy), rank[0]), min(ref_energy_rank(s_in, energy), rank[1])
        u, v = u[:, :r_out], v[:, :r_in]
    core = cores(u, v)
    norm_sq = sum(s * s * np.sum((b @ a) ** 2) for b, a, s in zip(bs, as_, scales, strict=True))
    err_sq = norm_sq - np.sum(core**2)
    for _ in range(n_iter):
        new_u = ref_left(ref_compress(bs, [a @ v for a in as_], scales), u.shape[1])[0]
        new_v = ref_left(ref_compress(a_ts, [b_t @ new_u for b_t in b_ts], scales), v.shape[1])[0]
        new_core = cores(new_u, new_v)
        new_err_sq = norm_sq - np.sum(new_core**2)
        if new_err_sq > err_sq:
            break
        improvement = err_sq - new_err_sq
        u, v, core, err_sq = new_u, new_v, new_core, new_err_sq
        if improvement <= tol * norm_sq:
            break
    return core, u, v


def lora(n_layers: int, d_out: int, d_in: int, ranks: list[int], seed: int):
    rng = np.random.default_rng(seed)
    bs = [rng.standard_normal((d_out, r)) / np.sqrt(d_out) for r in ranks[:n_layers]]
    as_ = [rng.standard_normal((r, d_in)) / np.sqrt(d_in) for r in ranks[:n_layers]]
    scales = list(rng.uniform(0.5, 2.0, n_layers))
    return bs, as_, scales


CASES = {
    "roberta rank 8": dict(n_layers=12, d_out=768, d_in=768, ranks=[8] * 12, rank=(8, 8)),
    "roberta rank 32": dict(n_layers=12, d_out=768, d_in=768, ranks=[8] * 12, rank=(32, 32)),
    "roberta rank 8, HOOI": dict(n_layers=12, d_out=768, d_in=768, ranks=[8] * 12, rank=(8, 8), n_iter=3),
    "rectangular, HOOI": dict(n_layers=6, d_out=300, d_in=200, ranks=[4] * 6, rank=(5, 7), n_iter=3),
    "per-layer ranks": dict(n_layers=3, d_out=60, d_in=50, ranks=[2, 4, 3], rank=(4, 3), n_iter=2),
    "energy": dict(n_layers=8, d_out=200, d_in=150, ranks=[4] * 8, rank=(32, 32), energy=0.8),
    "wide unfolding (no QR)": dict(n_layers=10, d_out=20, d_in=30, ranks=[4] * 10, rank=(5, 6)),
}


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("case", list(CASES))
def test_factored_core_matches_plain_reference(case, backend):
    spec = dict(CASES[case])
    rank, energy, n_iter = spec.pop("rank"), spec.pop("energy", None), spec.pop("n_iter", 0)
    bs, as_, scales = lora(seed=sorted(CASES).index(case), **spec)
    ref_core, ref_u, ref_v = ref_tucker2_lowrank(bs, as_, scales, rank, energy=energy, n_iter=n_iter)
    convert = torch.from_numpy if backend == "torch" else np.asarray
    if len({b.shape[1] for b in bs}) == 1:  # stacked arrays, as a PEFT checkpoint gives them
        B, A = convert(np.stack(bs)), convert(np.stack(as_))
    else:
        B, A = [convert(b) for b in bs], [convert(a) for a in as_]
    tucker = tlr.tucker2_lowrank(B, A, rank, scale=scales, energy=energy, n_iter=n_iter)
    core, u, v = (x.numpy() if backend == "torch" else x for x in tucker)
    assert core.shape == ref_core.shape and u.shape == ref_u.shape and v.shape == ref_v.shape
    for ours, ref in ((u, ref_u), (v, ref_v), (core, ref_core)):
        assert np.abs(ours - ref).max() <= TOL * max(1.0, np.abs(ref).max())


def test_factored_error_matches_plain_reference():
    bs, as_, scales = lora(12, 768, 768, [8] * 12, seed=3)
    tucker = tlr.tucker2_lowrank(np.stack(bs), np.stack(as_), 16, scale=scales)
    stack = np.stack([s * b @ a for b, a, s in zip(bs, as_, scales, strict=True)])
    reference = np.linalg.norm(stack - tucker.to_dense()) / np.linalg.norm(stack)
    assert abs(tlr.relative_error_lowrank(tucker, np.stack(bs), np.stack(as_), scales) - reference) < TOL
    assert abs(tlr.relative_error_lowrank(tucker, bs, as_, scales) - reference) < TOL
