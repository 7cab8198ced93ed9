"""LoRA-factored stacks ``dW_l = s_l B_l A_l``: validation, norms, cores and compressed unfoldings.

Shared by the factored decomposition (:mod:`.hosvd`) and the factored error (:mod:`.error`);
none of it forms a ``d_out x d_in`` matrix.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import tensorly as tl

from .backend import Array, as_float, backend_for, check_finite, check_ndim, compute_dtype, to_float
from .contract import PROJECT_LOWRANK, PROJECT_LOWRANK_LAYER, contract

ScaleArg = float | Sequence[float] | Array


def lowrank_layers(
    B: Array | Sequence[Array], A: Array | Sequence[Array], scale: ScaleArg
) -> tuple[list[Array], list[Array], list[float]]:
    """Validate LoRA factors and return them per layer, in the compute dtype.

    Parameters
    ----------
    B : array (L, d_out, r) or list of L arrays (d_out, r_l)
    A : array (L, r, d_in) or list of L arrays (r_l, d_in)
    scale : float or sequence of L floats

    Returns
    -------
    bs : list of L arrays (d_out, r_l)
    as_ : list of L arrays (r_l, d_in)
    scales : list of L floats

    Raises
    ------
    ValueError
        Naming the problem: layer counts, ranks or shapes that do not match, empty
        factors, NaN or Inf values.
    """
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
    """``sum_l ||s_l B_l A_l||_F^2`` from the r x r Gram matrices.

    Parameters
    ----------
    bs : list of L arrays (d_out, r_l)
    as_ : list of L arrays (r_l, d_in)
    scales : list of L floats
    """
    total = 0.0
    with backend_for(*bs, *as_):
        for b, a, s in zip(bs, as_, scales, strict=True):
            gram_b = tl.dot(tl.transpose(b), b)
            gram_a = tl.dot(a, tl.transpose(a))
            total += s * s * to_float(tl.sum(gram_b * gram_a))
    return max(total, 0.0)
