"""Tucker-2 decompositions of a stack of matrices: dense and LoRA-factored.

Both functions compute the HOSVD of the stack over its two matrix modes (the layer mode
is never compressed), then optionally refine it with HOOI sweeps. ``tucker2_lowrank``
gets the same result as ``tucker2`` from the LoRA factors, without forming any
``d_out x d_in`` matrix.
"""

from __future__ import annotations

from collections.abc import Sequence

from .backend import Array, backend_for, small_lapack_calls
from .lowrank import LowRankStack, ScaleArg, lowrank_layers
from .svd import LeftSingular, RankArg, check_common, choose_rank, dense_tucker2, hooi
from .tensor import Tucker2


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
    return Tucker2(*dense_tucker2(stack, rank, energy, n_iter, tol))


def tucker2_lowrank(
    B: Array | Sequence[Array],
    A: Array | Sequence[Array],
    rank: RankArg = None,
    *,
    scale: ScaleArg = 1.0,
    energy: float | None = None,
    n_iter: int = 0,
    tol: float = 1e-10,
) -> Tucker2:
    """Tucker-2 of the stack ``dW_l = scale_l * B_l @ A_l`` without forming any ``dW_l``.

    The mode-1 unfolding ``[dW_1, ..., dW_L]`` has the same left singular vectors and
    values as the thin matrix ``[s_l B_l T_l^T]_l`` (d_out, sum r_l), where
    ``A_l^T = Q_l T_l`` is a thin QR (only ``T_l`` is computed, batched over the layers of
    equal rank); mode 2 is symmetric. The cost is ``O(L*d*r^2 + d*(sum r_l)^2)``, and the
    result equals :func:`tucker2` on the materialised stack.

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
    r_out_req, r_in_req = check_common(rank, energy, n_iter)
    with small_lapack_calls(B):  # validation too: torch's isfinite took 34 ms on 2 threads of a busy machine
        stack = lowrank_layers(B, A, scale)
        return _factored_hosvd(stack, r_out_req, r_in_req, energy, n_iter, tol)


def _factored_hosvd(
    stack: LowRankStack, r_out_req: int | None, r_in_req: int | None, energy: float | None, n_iter: int, tol: float
) -> Tucker2:
    """The body of :func:`tucker2_lowrank`, on validated factors."""
    with backend_for(stack.first):
        n_layers, d_out, d_in = stack.shape
        out_svd, in_svd = LeftSingular(stack.out_unfolding()), LeftSingular(stack.in_unfolding())
        bound_out, bound_in = min(d_out, n_layers * d_in), min(d_in, n_layers * d_out)
        if r_out_req is None:  # exact by default: the unfoldings have rank <= sum r_l
            r_out_req, r_in_req = min(bound_out, stack.total_rank), min(bound_in, stack.total_rank)
        r_out = choose_rank(out_svd.values, bound_out, r_out_req, energy)
        r_in = choose_rank(in_svd.values, bound_in, r_in_req, energy)
        out_factor, in_factor = out_svd.basis(r_out), in_svd.basis(r_in)
        del out_svd, in_svd

        def update_out(v: Array) -> Array:  # left vectors of [s_l B_l (A_l V)]_l
            return LeftSingular(stack.out_unfolding(v)).basis(r_out)

        def update_in(u: Array) -> Array:  # left vectors of [s_l A_l^T (B_l^T U)]_l
            return LeftSingular(stack.in_unfolding(u)).basis(r_in)

        core, out_factor, in_factor = hooi(
            update_out, update_in, stack.cores, stack.norm_sq, out_factor, in_factor, n_iter, tol
        )
        return Tucker2(core, out_factor, in_factor)
