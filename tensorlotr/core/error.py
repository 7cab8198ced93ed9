"""Exact relative Frobenius errors of a Tucker-2 approximation."""

from __future__ import annotations

from collections.abc import Sequence

import tensorly as tl

from .backend import Array, as_float, backend_for, check_ndim, float64_of, small_lapack_calls, to_float
from .contract import contract
from .linalg import triangle
from .lowrank import ScaleArg, lowrank_layers, per_layer_sq, scales_like, swap
from .tensor import Tucker2


def _float64(x: Array) -> Array:
    return as_float(x, float64_of(x))


def _ratio(residual: float, reference: float) -> float:
    if reference == 0.0:
        return 0.0 if residual == 0.0 else float("inf")
    return residual / reference


def relative_error(tucker: Tucker2, stack: Array) -> float:
    """``||stack - tucker||_F / ||stack||_F``, computed in float64.

    Parameters
    ----------
    tucker : Tucker2
        Approximation of shape (L, d_out, d_in).
    stack : array, shape (L, d_out, d_in)

    Returns 0.0 when both are zero, and ``inf`` when only the stack is zero.
    """
    check_ndim(stack, 3, "stack", "(L, d_out, d_in)")
    if tuple(stack.shape) != tucker.shape:
        raise ValueError(f"stack has shape {tuple(stack.shape)} but the Tucker2 has shape {tucker.shape}")
    with backend_for(stack, tucker.core):
        x = _float64(stack)
        approx = Tucker2(_float64(tucker.core), _float64(tucker.out_factor), _float64(tucker.in_factor)).to_dense()
        return _ratio(to_float(tl.norm(x - approx)), to_float(tl.norm(x)))


def relative_error_lowrank(
    tucker: Tucker2,
    B: Array | Sequence[Array],
    A: Array | Sequence[Array],
    scale: ScaleArg = 1.0,
) -> float:
    """``||dW - tucker||_F / ||dW||_F`` for ``dW_l = scale_l B_l A_l``, never densified.

    With the factors orthonormalised (``U = Q_U R_U``, ``V = Q_V R_V``, so the cores become
    ``G'_l = R_U G_l R_V^T``), each layer's residual splits into three orthogonal parts:

    - ``(I - P_U) dW_l = s_l B_perp A_l`` with ``B_perp = B_l - Q_U (Q_U^T B_l)``;
    - ``P_U dW_l (I - P_V) = s_l Q_U C_l A_perp`` with ``C_l = Q_U^T B_l``, ``A_perp = A_l - (A_l Q_V) Q_V^T``;
    - ``Q_U (s_l C_l A_l Q_V - G'_l) Q_V^T``.

    Each squared norm is that of a small matrix built from thin-QR triangles of d x r
    factors, so nothing cancels (no ``||X||^2 - ||T||^2``); in float64, at ``O(L d r (r + r_out))``.

    Parameters
    ----------
    tucker : Tucker2
        Approximation of shape (L, d_out, d_in).
    B, A, scale
        As in :func:`tensorlotr.tucker2_lowrank`.
    """
    with small_lapack_calls(B):
        stack = lowrank_layers(B, A, scale)
        if stack.shape != tucker.shape:
            raise ValueError(
                f"LoRA factors describe a stack of shape {stack.shape} but the Tucker2 has shape {tucker.shape}"
            )
        with backend_for(stack.first, tucker.core):
            q_out, r_out = tl.qr(_float64(tucker.out_factor))
            q_in, r_in = tl.qr(_float64(tucker.in_factor))
            cores = contract("po,loi,qi->lpq", r_out, _float64(tucker.core), r_in)
            residual_sq = reference_sq = 0.0
            first = 0
            for batch in stack.batches:  # n layers of one rank: b (n, d_out, r), a (n, r, d_in)
                b, a, s, n = _float64(batch.B), _float64(batch.A), batch.scales, int(batch.B.shape[0])
                s_sq = scales_like(s * s, b)
                c = tl.matmul(tl.transpose(q_out), b)  # (n, r_out', r)
                d = tl.matmul(a, q_in)  # (n, r, r_in')
                r_a = swap(triangle(swap(a)))  # ||M A|| = ||M R_a^T|| for any M
                r_b_perp = triangle(b - tl.matmul(q_out, c))
                r_a_perp = swap(triangle(swap(a) - tl.matmul(q_in, swap(d))))
                residual_sq += _sum(s_sq * per_layer_sq(tl.matmul(r_b_perp, r_a)))
                residual_sq += _sum(s_sq * per_layer_sq(tl.matmul(c, r_a_perp)))
                residual_sq += _sum(
                    per_layer_sq(scales_like(s, b)[:, None, None] * tl.matmul(c, d) - cores[first : first + n])
                )
                reference_sq += _sum(s_sq * per_layer_sq(tl.matmul(triangle(b), r_a)))
                first += n
            return _ratio(residual_sq**0.5, reference_sq**0.5)


def _sum(x: Array) -> float:
    return to_float(tl.sum(x))
