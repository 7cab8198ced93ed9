"""Exact relative Frobenius errors of a Tucker-2 approximation."""

from __future__ import annotations

from collections.abc import Sequence

import tensorly as tl

from .backend import Array, as_float, backend_for, check_ndim, is_torch, to_float
from .hosvd import _lowrank_layers
from .tensor import Tucker2


def _float64(x: Array) -> Array:
    if is_torch(x):
        import torch

        return x.to(torch.float64)
    return as_float(x, "float64")


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
    scale: float | Sequence[float] | Array = 1.0,
) -> float:
    """``||dW - tucker||_F / ||dW||_F`` for ``dW_l = scale_l B_l A_l``, never densified.

    Each layer's residual ``s_l B_l A_l - U G_l V^T = [s_l B_l, -U G_l] @ [A_l; V^T]`` is a
    product of thin factors; its norm is ``||R_1 R_2^T||_F`` from their thin QRs, which
    avoids the cancellation of expanding ``||X||^2 - 2<X, T> + ||T||^2``. Computed in
    float64 at ``O(L*d*(r_l + r)^2)``.

    Parameters
    ----------
    tucker : Tucker2
        Approximation of shape (L, d_out, d_in).
    B, A, scale
        As in :func:`tensorlotr.tucker2_lowrank`.
    """
    bs, as_, scales = _lowrank_layers(B, A, scale)
    n_layers, d_out, d_in = len(bs), int(bs[0].shape[0]), int(as_[0].shape[1])
    if (n_layers, d_out, d_in) != tucker.shape:
        raise ValueError(
            f"LoRA factors describe a stack of shape {(n_layers, d_out, d_in)} but the Tucker2 has shape {tucker.shape}"
        )
    with backend_for(*bs, tucker.core):
        u, core, v = _float64(tucker.out_factor), _float64(tucker.core), _float64(tucker.in_factor)
        v_t = tl.transpose(v)
        residual_sq = reference_sq = 0.0
        for i, (b, a, s) in enumerate(zip(bs, as_, scales, strict=True)):
            b, a = _float64(b) * s, _float64(a)
            _, r_left = tl.qr(tl.concatenate([b, -tl.dot(u, core[i])], axis=1))
            _, r_right = tl.qr(tl.transpose(tl.concatenate([a, v_t], axis=0)))
            residual_sq += to_float(tl.norm(tl.dot(r_left, tl.transpose(r_right))) ** 2)
            _, rb = tl.qr(b)
            _, ra = tl.qr(tl.transpose(a))
            reference_sq += to_float(tl.norm(tl.dot(rb, tl.transpose(ra))) ** 2)
        return _ratio(residual_sq**0.5, reference_sq**0.5)
