"""LoRA-factored stacks ``dW_l = s_l B_l A_l``: validation, norms, cores and compressed unfoldings.

Shared by the factored decomposition (:mod:`.hosvd`) and the factored error (:mod:`.error`);
none of it forms a ``d_out x d_in`` matrix. Layers of equal rank are processed as one
batch (batched QRs and products over the stack), layers of different ranks one at a time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import tensorly as tl

from .backend import (
    Array,
    all_finite,
    as_float,
    backend_for,
    check_finite,
    check_ndim,
    compute_dtype,
    small_lapack_calls,
    to_float,
)
from .contract import PROJECT_LOWRANK, contract
from .linalg import triangle

ScaleArg = float | Sequence[float] | Array


@dataclass(frozen=True)
class Batch:
    """n consecutive layers of one rank r: ``B`` (n, d_out, r), ``A`` (n, r, d_in) and ``scales`` (n,).

    ``B`` and ``A`` are in the compute dtype; ``scales`` is a float64 numpy array.
    """

    B: Array
    A: Array
    scales: np.ndarray


def swap(x: Array) -> Array:
    """The matrices of a stack transposed: (n, p, q) -> (n, q, p), a view."""
    return tl.transpose(x, (0, 2, 1))


def per_layer_sq(x: Array) -> Array:
    """Squared Frobenius norm of each matrix of a stack: (n, p, q) -> (n,)."""
    return tl.sum(x * x, axis=(1, 2))


def scales_like(scales: np.ndarray, x: Array) -> Array:
    """``scales`` (n,) as an array on the backend, dtype and device of ``x``."""
    return tl.tensor(scales, **tl.context(x))


class LowRankStack:
    """Validated LoRA factors of a stack ``dW_l = s_l B_l A_l`` (L, d_out, d_in), in the compute dtype.

    Attributes
    ----------
    batches : list of Batch
        The layers in order, in runs of equal rank: ``B`` (n, d_out, r), ``A`` (n, r, d_in)
        and the scales (n,). One batch when all layers have the same rank.
    shape : (L, d_out, d_in)
    total_rank : int
        ``sum_l r_l``.
    """

    def __init__(self, batches: list[Batch]) -> None:
        self.batches = batches
        first = batches[0]
        self.shape = (sum(int(x.B.shape[0]) for x in batches), int(first.B.shape[1]), int(first.A.shape[2]))
        self.total_rank = sum(int(x.B.shape[0]) * int(x.B.shape[2]) for x in batches)

    @property
    def first(self) -> Array:
        """An array of the stack, to pick the backend by."""
        return self.batches[0].B

    def out_unfolding(self, in_factor: Array | None = None) -> Array:
        """A thin matrix (d_out, sum r_l) with the left singular vectors and values of ``[dW_l V]_l``.

        ``V`` (d_in, r_in) is ``in_factor``, or the identity when it is None. See :func:`compress`.
        """
        return _concat_columns(
            [
                compress(x.B, swap(x.A) if in_factor is None else swap(tl.matmul(x.A, in_factor)), x.scales)
                for x in self.batches
            ]
        )

    def in_unfolding(self, out_factor: Array | None = None) -> Array:
        """A thin matrix (d_in, sum r_l) with the left singular vectors and values of ``[dW_l^T U]_l``."""
        return _concat_columns(
            [
                compress(swap(x.A), x.B if out_factor is None else tl.matmul(tl.transpose(out_factor), x.B), x.scales)
                for x in self.batches
            ]
        )

    def cores(self, out_factor: Array, in_factor: Array) -> Array:
        """``G_l = s_l U^T B_l A_l V``, shape (L, r_out, r_in), never forming ``B_l A_l``."""
        parts = [
            contract(PROJECT_LOWRANK, out_factor, x.B, x.A, in_factor) * scales_like(x.scales, x.B)[:, None, None]
            for x in self.batches
        ]
        return parts[0] if len(parts) == 1 else tl.concatenate(parts, axis=0)

    def norm_sq(self) -> float:
        """``sum_l ||s_l B_l A_l||_F^2`` from the r x r Gram matrices."""
        total = 0.0
        for x in self.batches:
            grams = tl.matmul(swap(x.B), x.B) * tl.matmul(x.A, swap(x.A))  # (n, r, r)
            total += to_float(tl.sum(tl.sum(grams, axis=(1, 2)) * scales_like(x.scales * x.scales, x.B)))
        return max(total, 0.0)


def compress(lefts: Array, rights_t: Array, scales: np.ndarray) -> Array:
    """``M_l = s_l lefts_l T_l^T`` for a batch, where ``rights_t_l = Q_l T_l`` is a thin QR.

    ``lefts_l @ rights_t_l^T = (lefts_l @ T_l^T) @ Q_l^T`` and the ``Q_l^T`` have orthonormal
    rows, so ``[M_l]_l`` has the left singular vectors and values of ``[s_l lefts_l rights_t_l^T]_l``
    with r columns per layer instead of c. The scales multiply the small ``T_l``.

    Parameters
    ----------
    lefts : array, shape (n, d, r)
    rights_t : array, shape (n, c, r)
    scales : array, shape (n,)

    Returns
    -------
    array, shape (n, d, min(c, r))
    """
    t = triangle(rights_t) * scales_like(scales, rights_t)[:, None, None]
    return tl.matmul(lefts, swap(t))


def _concat_columns(parts: list[Array]) -> Array:
    """Blocks (n, d, k) side by side, layer after layer: a (d, sum n*k) matrix."""
    columns = [tl.reshape(tl.transpose(m, (1, 0, 2)), (int(m.shape[1]), -1)) for m in parts]
    return columns[0] if len(columns) == 1 else tl.concatenate(columns, axis=1)


def _per_layer(x: Array | Sequence[Array], name: str, shape_doc: str) -> list[Array]:
    if isinstance(x, Sequence):
        return list(x)
    check_ndim(x, 3, name, shape_doc)
    return [x[i] for i in range(x.shape[0])]


def _check_finite(whole: Array | Sequence[Array], layers: list[Array], name: str) -> None:
    """One check of a stacked array; layer by layer (to name the layer) for lists or on failure."""
    if not isinstance(whole, (list, tuple)) and all_finite(whole):
        return
    for i, layer in enumerate(layers):
        check_finite(layer, f"{name}[{i}]")


def per_layer_floats(value: ScaleArg, n_layers: int, what: str) -> np.ndarray:
    """``value`` (one float, or one per layer) as ``n_layers`` finite float64s; ``ValueError`` naming ``what``."""
    if isinstance(value, Sequence):
        floats = np.asarray([float(v) for v in value])
    elif np.ndim(value) == 0 and not (hasattr(value, "shape") and len(value.shape) > 0):
        floats = np.full(n_layers, float(value))
    else:
        floats = np.asarray([float(v) for v in tl.to_numpy(value)])
    if len(floats) != n_layers:
        raise ValueError(f"{what} has {len(floats)} values for {n_layers} layers")
    if not np.isfinite(floats).all():
        raise ValueError(f"{what} contains NaN or Inf values")
    return floats


def check_factors(
    B: Array | Sequence[Array], A: Array | Sequence[Array], scale: ScaleArg
) -> tuple[list[Array], list[Array], np.ndarray]:
    """The layers of LoRA factors, their shapes checked, as given (no copy, no dtype change, no finiteness check).

    Parameters
    ----------
    B : array (L, d_out, r) or list of L arrays (d_out, r_l)
    A : array (L, r, d_in) or list of L arrays (r_l, d_in)
    scale : float or sequence of L floats

    Returns
    -------
    bs : list of L arrays (d_out, r_l)
    as_ : list of L arrays (r_l, d_in)
    scales : float64 array (L,)

    Raises
    ------
    ValueError
        Naming the problem: layer counts, ranks or shapes that do not match, empty factors,
        scales that are not finite.
    """
    bs, as_ = _per_layer(B, "B", "(L, d_out, r)"), _per_layer(A, "A", "(L, r, d_in)")
    if len(bs) != len(as_):
        raise ValueError(f"B has {len(bs)} layers but A has {len(as_)}")
    if not bs:
        raise ValueError("B and A must hold at least one layer")
    scales = per_layer_floats(scale, len(bs), "scale")
    d_out, d_in = bs[0].shape[0], as_[0].shape[1]
    for i, (b, a) in enumerate(zip(bs, as_, strict=True)):
        check_ndim(b, 2, f"B[{i}]", "(d_out, r)")
        check_ndim(a, 2, f"A[{i}]", "(r, d_in)")
        if b.shape[1] != a.shape[0]:
            raise ValueError(f"layer {i}: B has rank {b.shape[1]} but A has rank {a.shape[0]}")
        if b.shape[0] != d_out or a.shape[1] != d_in:
            raise ValueError(
                f"layer {i}: B {tuple(b.shape)} and A {tuple(a.shape)} do not match "
                f"d_out={d_out}, d_in={d_in} of layer 0"
            )
        if b.shape[1] == 0 or b.shape[0] == 0 or a.shape[1] == 0:
            raise ValueError(f"layer {i}: empty factors B {tuple(b.shape)}, A {tuple(a.shape)}")
    return bs, as_, scales


def lowrank_layers(B: Array | Sequence[Array], A: Array | Sequence[Array], scale: ScaleArg) -> LowRankStack:
    """Validate LoRA factors and batch them by rank, in the compute dtype.

    Parameters
    ----------
    B : array (L, d_out, r) or list of L arrays (d_out, r_l)
    A : array (L, r, d_in) or list of L arrays (r_l, d_in)
    scale : float or sequence of L floats

    Returns
    -------
    LowRankStack
        Stacked arrays are used as they are (converted once if their dtype is not the
        compute dtype); lists of equal rank are stacked.

    Raises
    ------
    ValueError
        Naming the problem: layer counts, ranks or shapes that do not match, empty
        factors, NaN or Inf values.
    """
    bs, as_, scales = check_factors(B, A, scale)
    _check_finite(B, bs, "B")
    _check_finite(A, as_, "A")
    dtype = compute_dtype(bs[0])
    if len({int(b.shape[1]) for b in bs}) > 1:
        return LowRankStack(
            [
                Batch(as_float(b, dtype)[None], as_float(a, dtype)[None], scales[i : i + 1])
                for i, (b, a) in enumerate(zip(bs, as_, strict=True))
            ]
        )
    with backend_for(bs[0]):
        return LowRankStack([Batch(_stacked(B, bs, dtype), _stacked(A, as_, dtype), scales)])


def _stacked(whole: Array | Sequence[Array], layers: list[Array], dtype: Any) -> Array:
    if isinstance(whole, (list, tuple)):
        return tl.stack([as_float(layer, dtype) for layer in layers])
    return as_float(whole, dtype)


def lowrank_norm_sq(B: Array | Sequence[Array], A: Array | Sequence[Array], scale: ScaleArg = 1.0) -> float:
    """``sum_l ||s_l B_l A_l||_F^2`` of LoRA factors (as in :func:`lowrank_layers`), from r x r Gram matrices."""
    with small_lapack_calls(B):
        stack = lowrank_layers(B, A, scale)
        with backend_for(stack.first):
            return stack.norm_sq()
