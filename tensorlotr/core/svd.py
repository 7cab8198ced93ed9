"""The HOSVD's building blocks: rank choice, left singular vectors, HOOI sweeps, the dense route.

Everything here works on plain arrays and returns plain arrays, so :mod:`.tensor` (the
``Tucker2`` class) and :mod:`.hosvd` (the public decompositions) both build on it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import tensorly as tl

from .backend import (
    Array,
    as_float,
    backend_for,
    check_energy,
    check_finite,
    check_ndim,
    compute_dtype,
    is_torch,
    normalize_rank,
    to_float,
)
from .contract import PROJECT_DENSE, contract
from .linalg import Householder, left_svd

RankArg = int | Sequence[int] | None


def choose_rank(singular_values: Array, bound: int, rank: int | None, energy: float | None) -> int:
    """The rank to keep for one mode.

    Parameters
    ----------
    singular_values : array, shape (k,)
        Singular values of the mode's unfolding, in decreasing order.
    bound : int
        The largest rank the mode can have.
    rank : int or None
        The requested rank; clipped to ``bound``.
    energy : float or None
        If given, the smallest rank whose discarded squared singular values are at most
        ``1 - energy`` of the total (at least 1), then capped by ``rank``. The comparison
        allows the rounding of the values' dtype (a share of 1e-10 of the total in float32,
        1e-12 in float64), so ``energy=1`` keeps the numerical rank: the exact rank.
    """
    cap = bound if rank is None else min(rank, bound)
    if energy is None:
        return cap
    values = singular_values.detach().cpu().numpy() if is_torch(singular_values) else singular_values
    values = np.asarray(values)
    squares = values.astype(np.float64) ** 2
    total = squares.sum()
    if total == 0.0:
        return 1
    # discarded[k] = energy left out when keeping the first k values
    discarded = np.maximum(total - np.concatenate([[0.0], np.cumsum(squares)]), 0.0)
    rounding = 1e-12 if values.dtype == np.float64 else 1e-10
    allowed = (1.0 - float(energy) + rounding) * total
    within = np.nonzero(discarded <= allowed)[0]
    keep = int(within[0]) if within.size else len(squares)
    return max(1, min(keep, cap))


def complete_basis(basis: Array, rank: int) -> Array:
    """The first ``rank`` columns of ``basis`` (d, k), completed with orthonormal columns if k < rank."""
    d, k = basis.shape
    if k >= rank:
        return basis[:, :rank]
    # a fixed seed keeps decompositions deterministic
    extra = tl.tensor(np.random.default_rng(0).standard_normal((d, rank - k)), **tl.context(basis))
    for _ in range(2):  # project twice for numerical orthogonality
        extra = extra - tl.dot(basis, tl.dot(tl.transpose(basis), extra))
    q, _ = tl.qr(extra)
    return tl.concatenate([basis, q], axis=1)


class LeftSingular:
    """Left singular vectors and values of a matrix (d, k), with columns formed only when asked for.

    For a tall matrix the SVD runs on the (k, k) triangle of a thin QR whose ``Q`` stays as
    Householder reflectors, and :meth:`basis` applies ``Q`` only to the ``rank`` columns it
    returns. ``values`` holds the min(d, k) singular values in decreasing order.
    """

    def __init__(self, matrix: Array) -> None:
        rows, cols = matrix.shape
        self.qr: Householder | None = None
        if rows > 2 * cols:  # tall: a thin QR first, then the SVD of the small triangular factor
            self.qr = Householder(matrix)
            matrix = self.qr.r
        self.u, self.values = left_svd(matrix)

    def basis(self, rank: int) -> Array:
        """The leading ``rank`` left singular vectors (d, rank), completed if the matrix has fewer."""
        u = self.u[:, :rank]
        if self.qr is not None:
            u = self.qr.apply_q(u)
        return complete_basis(u, rank)


def check_common(rank: RankArg, energy: float | None, n_iter: int) -> tuple[int, int] | tuple[None, None]:
    """Validate the arguments every decomposition takes; ``rank`` as ``(r_out, r_in)`` or ``(None, None)``."""
    check_energy(energy)
    if int(n_iter) < 0:
        raise ValueError(f"n_iter must be >= 0, got {n_iter}")
    pair = normalize_rank(rank)
    return pair if pair is not None else (None, None)


def hooi(
    update_out: Callable[[Array], Array],
    update_in: Callable[[Array], Array],
    cores_of: Callable[[Array, Array], Array],
    norm_sq: Callable[[], float],
    out_factor: Array,
    in_factor: Array,
    n_iter: int,
    tol: float,
) -> tuple[Array, Array, Array]:
    """HOOI sweeps shared by the dense and factored forms: ``(core, out_factor, in_factor)``.

    ``update_out(V)`` and ``update_in(U)`` return the new factors, ``cores_of(U, V)`` the
    cores, ``norm_sq()`` the squared norm of the stack (only called if ``n_iter > 0``).
    The error never increases: a sweep that would raise it is dropped.
    """
    core = cores_of(out_factor, in_factor)
    if int(n_iter) == 0:
        return core, out_factor, in_factor
    total_sq = norm_sq()
    err_sq = total_sq - to_float(tl.norm(core) ** 2)
    for _ in range(int(n_iter)):
        new_out = update_out(in_factor)
        new_in = update_in(new_out)
        new_core = cores_of(new_out, new_in)
        new_err_sq = total_sq - to_float(tl.norm(new_core) ** 2)
        if new_err_sq > err_sq:
            break
        improvement = err_sq - new_err_sq
        out_factor, in_factor, core, err_sq = new_out, new_in, new_core, new_err_sq
        if improvement <= tol * max(total_sq, np.finfo(float).tiny):
            break
    return core, out_factor, in_factor


def dense_tucker2(
    stack: Array, rank: RankArg, energy: float | None, n_iter: int, tol: float
) -> tuple[Array, Array, Array]:
    """The algorithm of :func:`tensorlotr.tucker2` on plain arrays.

    Parameters
    ----------
    stack : array, shape (L, d_out, d_in)
    rank, energy, n_iter, tol
        As in :func:`tensorlotr.tucker2`.

    Returns
    -------
    core : array, shape (L, r_out, r_in)
    out_factor : array, shape (d_out, r_out)
        Orthonormal columns.
    in_factor : array, shape (d_in, r_in)
        Orthonormal columns.
    """
    r_out_req, r_in_req = check_common(rank, energy, n_iter)
    check_ndim(stack, 3, "stack", "(L, d_out, d_in)")
    if min(stack.shape) == 0:
        raise ValueError(f"stack must not be empty, got shape {tuple(stack.shape)}")
    check_finite(stack, "stack")
    with backend_for(stack):
        x = as_float(stack, compute_dtype(stack))
        n_layers, d_out, d_in = (int(n) for n in x.shape)
        out_svd, in_svd = LeftSingular(tl.unfold(x, 1)), LeftSingular(tl.unfold(x, 2))
        r_out = choose_rank(out_svd.values, min(d_out, n_layers * d_in), r_out_req, energy)
        r_in = choose_rank(in_svd.values, min(d_in, n_layers * d_out), r_in_req, energy)
        out_factor, in_factor = out_svd.basis(r_out), in_svd.basis(r_in)
        del out_svd, in_svd

        def cores_of(u: Array, v: Array) -> Array:
            return contract(PROJECT_DENSE, u, x, v)

        def update_out(v: Array) -> Array:
            return LeftSingular(tl.unfold(contract("lmn,ni->lmi", x, v), 1)).basis(r_out)

        def update_in(u: Array) -> Array:
            return LeftSingular(tl.unfold(contract("mo,lmn->lon", u, x), 2)).basis(r_in)

        def norm_sq() -> float:
            return to_float(tl.norm(x) ** 2)

        return hooi(update_out, update_in, cores_of, norm_sq, out_factor, in_factor, n_iter, tol)
