"""Tucker-2 decompositions of a stack of matrices: dense and LoRA-factored.

Both functions compute the HOSVD of the stack over its two matrix modes (the layer mode
is never compressed), then optionally refine it with HOOI sweeps. ``tucker2_lowrank``
gets the same result as ``tucker2`` from the LoRA factors, without forming any
``d_out x d_in`` matrix.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

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
    small_lapack_calls,
    to_float,
)
from .contract import PROJECT_DENSE, PROJECT_LOWRANK, PROJECT_LOWRANK_LAYER, contract
from .tensor import Tucker2

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
        ``1 - energy`` of the total (at least 1), then capped by ``rank``.
    """
    cap = bound if rank is None else min(rank, bound)
    if energy is None:
        return cap
    values = singular_values.detach().cpu().numpy() if is_torch(singular_values) else singular_values
    squares = np.asarray(values, dtype=np.float64) ** 2
    total = squares.sum()
    if total == 0.0:
        return 1
    # discarded[k] = energy left out when keeping the first k values
    discarded = total - np.concatenate([[0.0], np.cumsum(squares)])
    allowed = (1.0 - float(energy)) * total * (1.0 + 1e-12)
    keep = int(np.argmax(discarded <= allowed))
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
    """Left singular vectors and values of a matrix, with columns formed only when asked for.

    For a tall matrix (d, k) the SVD runs on the (k, k) triangle of a thin QR, and
    :meth:`basis` multiplies only the ``rank`` columns it returns by ``Q``.
    """

    def __init__(self, matrix: Array) -> None:
        rows, cols = matrix.shape
        self.q: Array | None = None
        if rows > 2 * cols:  # tall: a thin QR first, then the SVD of the small triangular factor
            self.q, matrix = tl.qr(matrix)
        self.u, self.values, _ = tl.svd_interface(matrix, method="truncated_svd", n_eigenvecs=None)

    def basis(self, rank: int) -> Array:
        """The leading ``rank`` left singular vectors (d, rank), completed if the matrix has fewer."""
        u = self.u[:, :rank]
        if self.q is not None:
            u = tl.dot(self.q, u)
        return complete_basis(u, rank)


def compress_blocks(lefts: Sequence[Array], rights: Sequence[Array], scales: Sequence[float] | None = None) -> Array:
    """A thin matrix ``K`` with the left singular structure of ``[s_l lefts_l @ rights_l]_l``.

    With ``rights_l.T = Q_l T_l`` (thin QR), ``lefts_l @ rights_l = (lefts_l @ T_l.T) @ Q_l.T``
    and the ``Q_l.T`` blocks have orthonormal rows, so ``K = [s_l lefts_l @ T_l.T]_l`` has the
    same left singular vectors and values, at ``sum_l r_l`` columns instead of ``L*c``.
    The scales multiply the small ``T_l``, never a large factor.
    """
    scales = scales if scales is not None else [1.0] * len(lefts)
    blocks = []
    for left, right, scale in zip(lefts, rights, scales, strict=True):
        _, t = tl.qr(tl.transpose(right))
        blocks.append(tl.dot(left, tl.transpose(t * scale)))
    return tl.concatenate(blocks, axis=1)


def _check_common(rank: RankArg, energy: float | None, n_iter: int) -> tuple[int, int] | tuple[None, None]:
    check_energy(energy)
    if int(n_iter) < 0:
        raise ValueError(f"n_iter must be >= 0, got {n_iter}")
    pair = normalize_rank(rank)
    return pair if pair is not None else (None, None)


def _hooi(
    update_out: Any,
    update_in: Any,
    cores_of: Any,
    norm_sq: float,
    out_factor: Array,
    in_factor: Array,
    n_iter: int,
    tol: float,
) -> tuple[Array, Array, Array]:
    """HOOI sweeps shared by the dense and factored forms.

    ``update_out(V)`` and ``update_in(U)`` return the new factors, ``cores_of(U, V)`` the
    cores. The error never increases: a sweep that would raise it is dropped.
    """
    core = cores_of(out_factor, in_factor)
    err_sq = norm_sq - to_float(tl.norm(core) ** 2)
    for _ in range(int(n_iter)):
        new_out = update_out(in_factor)
        new_in = update_in(new_out)
        new_core = cores_of(new_out, new_in)
        new_err_sq = norm_sq - to_float(tl.norm(new_core) ** 2)
        if new_err_sq > err_sq:
            break
        improvement = err_sq - new_err_sq
        out_factor, in_factor, core, err_sq = new_out, new_in, new_core, new_err_sq
        if improvement <= tol * max(norm_sq, np.finfo(float).tiny):
            break
    return core, out_factor, in_factor


def tucker2(
    stack: Array, rank: RankArg = None, *, energy: float | None = None, n_iter: int = 0, tol: float = 1e-10
) -> Tucker2:
    """Tucker-2 decomposition of a dense stack: HOSVD over modes 1 and 2, then HOOI.

    Parameters
    ----------
    stack : array, shape (L, d_out, d_in)
        The matrices dW_l, layer first. float32 and float64 are kept; half precision
        is computed in float32.
    rank : int or (r_out, r_in), optional
        Tucker ranks of the two matrix modes. A rank larger than a mode can have
        (``min(d_out, L*d_in)`` for mode 1, ``min(d_in, L*d_out)`` for mode 2) is clipped
        to it. ``None`` keeps the full rank, which is exact.
    energy : float in (0, 1], optional
        Keep, for each mode, the smallest rank whose discarded squared singular values
        are at most ``1 - energy`` of the total. ``rank``, if also given, caps it.
    n_iter : int
        Number of HOOI sweeps after the HOSVD. Sweeps never increase the error.
    tol : float
        Stop sweeping when the squared error falls by less than ``tol * ||stack||^2``.

    Returns
    -------
    Tucker2
        ``core`` (L, r_out, r_in) and orthonormal ``out_factor`` (d_out, r_out) and
        ``in_factor`` (d_in, r_in).
    """
    r_out_req, r_in_req = _check_common(rank, energy, n_iter)
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

        norm_sq = to_float(tl.norm(x) ** 2)
        core, out_factor, in_factor = _hooi(
            update_out, update_in, cores_of, norm_sq, out_factor, in_factor, n_iter, tol
        )
        return Tucker2(core, out_factor, in_factor)


def _lowrank_layers(
    B: Array | Sequence[Array], A: Array | Sequence[Array], scale: float | Sequence[float] | Array
) -> tuple[list[Array], list[Array], list[float]]:
    """Validate LoRA factors and return per-layer lists ``B_l`` (d_out, r_l), ``A_l`` (r_l, d_in), ``s_l``."""
    if isinstance(B, (list, tuple)):
        bs = list(B)
    else:
        check_ndim(B, 3, "B", "(L, d_out, r)")
        bs = [B[i] for i in range(B.shape[0])]
    if isinstance(A, (list, tuple)):
        as_ = list(A)
    else:
        check_ndim(A, 3, "A", "(L, r, d_in)")
        as_ = [A[i] for i in range(A.shape[0])]
    if len(bs) != len(as_):
        raise ValueError(f"B has {len(bs)} layers but A has {len(as_)}")
    if not bs:
        raise ValueError("B and A must hold at least one layer")
    n_layers = len(bs)
    if np.ndim(scale) == 0 and not (hasattr(scale, "shape") and len(scale.shape) > 0):
        scales = [float(scale)] * n_layers
    else:
        scales = [float(s) for s in (tl.to_numpy(scale) if hasattr(scale, "shape") else scale)]
        if len(scales) != n_layers:
            raise ValueError(f"scale has {len(scales)} values for {n_layers} layers")
    if not all(np.isfinite(scales)):
        raise ValueError("scale contains NaN or Inf values")
    d_out = d_in = None
    for i, (b, a) in enumerate(zip(bs, as_, strict=True)):
        check_ndim(b, 2, f"B[{i}]", "(d_out, r)")
        check_ndim(a, 2, f"A[{i}]", "(r, d_in)")
        if d_out is None:
            d_out, d_in = b.shape[0], a.shape[1]
        if b.shape[1] != a.shape[0]:
            raise ValueError(f"layer {i}: B has rank {b.shape[1]} but A has rank {a.shape[0]}")
        if b.shape[0] != d_out or a.shape[1] != d_in:
            raise ValueError(
                f"layer {i}: B {tuple(b.shape)} and A {tuple(a.shape)} do not match "
                f"d_out={d_out}, d_in={d_in} of layer 0"
            )
        if b.shape[1] == 0 or b.shape[0] == 0 or a.shape[1] == 0:
            raise ValueError(f"layer {i}: empty factors B {tuple(b.shape)}, A {tuple(a.shape)}")
        check_finite(b, f"B[{i}]")
        check_finite(a, f"A[{i}]")
    dtype = compute_dtype(bs[0])
    return [as_float(b, dtype) for b in bs], [as_float(a, dtype) for a in as_], scales


def lowrank_cores(out_factor: Array, in_factor: Array, bs: list[Array], as_: list[Array], scales: list[float]) -> Array:
    """Cores ``G_l = s_l U^T B_l A_l V``, shape (L, r_out, r_in), never forming ``B_l A_l``."""
    if len({int(b.shape[1]) for b in bs}) == 1:
        core = contract(PROJECT_LOWRANK, out_factor, tl.stack(bs), tl.stack(as_), in_factor)
        return core * tl.tensor(np.asarray(scales), **tl.context(core))[:, None, None]
    return tl.stack(
        [
            s * contract(PROJECT_LOWRANK_LAYER, out_factor, b, a, in_factor)
            for b, a, s in zip(bs, as_, scales, strict=False)
        ]
    )


def lowrank_norm_sq(bs: list[Array], as_: list[Array], scales: list[float]) -> float:
    """``sum_l ||s_l B_l A_l||_F^2`` from the r x r Gram matrices."""
    total = 0.0
    with backend_for(*bs, *as_):
        for b, a, s in zip(bs, as_, scales, strict=True):
            gram_b = tl.dot(tl.transpose(b), b)
            gram_a = tl.dot(a, tl.transpose(a))
            total += s * s * to_float(tl.sum(gram_b * gram_a))
    return max(total, 0.0)


def tucker2_lowrank(
    B: Array | Sequence[Array],
    A: Array | Sequence[Array],
    rank: RankArg = None,
    *,
    scale: float | Sequence[float] | Array = 1.0,
    energy: float | None = None,
    n_iter: int = 0,
    tol: float = 1e-10,
) -> Tucker2:
    """Tucker-2 of the stack ``dW_l = scale_l * B_l @ A_l`` without forming any ``dW_l``.

    The mode-1 unfolding ``[dW_1, ..., dW_L]`` has the same left singular vectors and
    values as the thin matrix ``[s_l B_l T_l^T]_l`` (d_out, sum r_l), where
    ``A_l^T = Q_l T_l`` is a thin QR; mode 2 is symmetric. The cost is
    ``O(L*d*r^2 + d*(sum r_l)^2)``, and the result equals :func:`tucker2` on the
    materialised stack.

    Parameters
    ----------
    B : array (L, d_out, r) or list of L arrays (d_out, r_l)
        LoRA up-projections; per-layer ranks are allowed as lists.
    A : array (L, r, d_in) or list of L arrays (r_l, d_in)
        LoRA down-projections.
    rank : int or (r_out, r_in), optional
        As in :func:`tucker2`: a rank larger than the mode's bound is clipped to it.
        ``None`` keeps the exact rank, ``min(d_out, L*d_in, sum r_l)`` for mode 1.
    scale : float or sequence of L floats
        Per-layer scale ``s_l`` (LoRA's ``alpha / r``); the cores absorb it.
    energy, n_iter, tol
        As in :func:`tucker2`; HOOI sweeps also run in factored form.

    Returns
    -------
    Tucker2
        ``core`` (L, r_out, r_in), orthonormal ``out_factor`` (d_out, r_out) and
        ``in_factor`` (d_in, r_in).
    """
    r_out_req, r_in_req = _check_common(rank, energy, n_iter)
    bs, as_, scales = _lowrank_layers(B, A, scale)
    with backend_for(*bs, *as_), small_lapack_calls(*bs):
        n_layers, d_out, d_in = len(bs), int(bs[0].shape[0]), int(as_[0].shape[1])
        total_rank = sum(int(b.shape[1]) for b in bs)
        a_ts = [tl.transpose(a) for a in as_]
        b_ts = [tl.transpose(b) for b in bs]
        out_svd = LeftSingular(compress_blocks(bs, as_, scales))
        in_svd = LeftSingular(compress_blocks(a_ts, b_ts, scales))
        bound_out, bound_in = min(d_out, n_layers * d_in), min(d_in, n_layers * d_out)
        if r_out_req is None:  # exact by default: the unfoldings have rank <= sum r_l
            r_out_req, r_in_req = min(bound_out, total_rank), min(bound_in, total_rank)
        r_out = choose_rank(out_svd.values, bound_out, r_out_req, energy)
        r_in = choose_rank(in_svd.values, bound_in, r_in_req, energy)
        out_factor, in_factor = out_svd.basis(r_out), in_svd.basis(r_in)
        del out_svd, in_svd

        def cores_of(u: Array, v: Array) -> Array:
            return lowrank_cores(u, v, bs, as_, scales)

        def update_out(v: Array) -> Array:  # left vectors of [s_l B_l (A_l V)]_l
            return LeftSingular(compress_blocks(bs, [tl.dot(a, v) for a in as_], scales)).basis(r_out)

        def update_in(u: Array) -> Array:  # left vectors of [s_l A_l^T (B_l^T U)]_l
            return LeftSingular(compress_blocks(a_ts, [tl.dot(b_t, u) for b_t in b_ts], scales)).basis(r_in)

        core, out_factor, in_factor = _hooi(
            update_out, update_in, cores_of, lowrank_norm_sq(bs, as_, scales), out_factor, in_factor, n_iter, tol
        )
        return Tucker2(core, out_factor, in_factor)
