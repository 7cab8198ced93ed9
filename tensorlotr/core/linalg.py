"""LAPACK steps that tensorly does not expose, on numpy (scipy's LAPACK) and torch.

- :func:`triangle`: only ``R`` of thin QRs, batched over a stack, when ``Q`` is never used;
- :class:`Householder`: a thin QR kept as Householder reflectors, so that ``Q`` is applied
  to the few columns that are kept instead of being formed (``d x k``) and thrown away;
- :func:`left_svd`: left singular vectors and values with tensorly's sign rule.
"""

from __future__ import annotations

import numpy as np
import tensorly as tl
from scipy.linalg import get_lapack_funcs

from .backend import Array, is_torch

# LAPACK's ?ormqr needs n*nb + (nb+1)*nb of workspace for its blocked code, nb <= 64
_BLOCK = 64


def triangle(x: Array) -> Array:
    """``R`` of the thin QR of each matrix of ``x``.

    Parameters
    ----------
    x : array, shape (..., m, n)

    Returns
    -------
    array, shape (..., min(m, n), n)
        Upper triangular, the same ``R`` as ``tl.qr(x)`` gives, without forming ``Q``.
    """
    out = tl.qr(x, mode="r")
    return out[1] if isinstance(out, tuple) else out  # torch returns (empty Q, R)


class Householder:
    """The thin QR ``x = Q R`` of a tall matrix, ``Q`` kept as Householder reflectors.

    Parameters
    ----------
    x : array, shape (m, n), m >= n
    """

    def __init__(self, x: Array) -> None:
        self.rows, cols = (int(n) for n in x.shape)
        self.r: Array
        if is_torch(x):
            import torch

            self._reflectors, self._tau = torch.geqrf(x)
            self.r = torch.triu(self._reflectors[:cols])
        else:
            geqrf, self._ormqr = get_lapack_funcs(("geqrf", "ormqr"), (x,))
            self._reflectors, self._tau, _, info = geqrf(x, lwork=max(1, cols) * _BLOCK)
            if info != 0:
                raise ValueError(f"LAPACK geqrf failed with info={info}")
            self.r = np.triu(self._reflectors[:cols])

    def apply_q(self, c: Array) -> Array:
        """``Q @ c`` for ``c`` of shape (n, k), a (m, k) array; ``Q`` is never formed."""
        cols, k = (int(n) for n in c.shape)
        padded = tl.zeros((self.rows, k), **tl.context(c))
        padded[:cols] = c
        if is_torch(c):
            import torch

            return torch.ormqr(self._reflectors, self._tau, padded)
        lwork = max(1, k) * _BLOCK + (_BLOCK + 1) * _BLOCK
        out, _, info = self._ormqr("L", "N", self._reflectors, self._tau, padded, lwork=lwork, overwrite_c=1)
        if info != 0:
            raise ValueError(f"LAPACK ormqr failed with info={info}")
        return out


#: A matrix (m, n) at least this wide (n >= WIDE * m), with m >= WIDE_MIN_ROWS, takes the Gram route.
WIDE, WIDE_MIN_ROWS = 4, 512


def left_svd(x: Array) -> tuple[Array, Array]:
    """Left singular vectors and values of ``x`` (m, n): ``u`` (m, min(m, n)), ``s`` (min(m, n),).

    A wide matrix (a zoo's unfolding: n = adapters x layers x rank columns against m = d rows)
    takes the eigendecomposition of its Gram matrix ``x x^T`` (m, m): ``m^2 n`` flops in one
    GEMM, against the SVD's several times that. It squares the condition number, so singular
    values below ``sqrt(eps)`` of the largest lose their relative accuracy; the leading vectors,
    which a decomposition keeps, do not. Signs follow tensorly's ``svd_flip``: each column's
    entry of largest magnitude is positive.
    """
    m, n = (int(k) for k in x.shape)
    if n >= WIDE * m and m >= WIDE_MIN_ROWS:
        values, vectors = tl.eigh(tl.dot(x, tl.transpose(x)))  # ascending
        if is_torch(values):  # largest first
            values, vectors = values.flip(0), vectors.flip(1)
        else:
            values, vectors = values[::-1], vectors[:, ::-1]
        u, s = vectors, tl.sqrt(tl.clip(values, 0, None))
    else:
        u, s, _ = tl.svd(x, full_matrices=False)
    rows = tl.argmax(tl.abs(u), axis=0)
    signs = tl.sign(u[rows, tl.arange(int(u.shape[1]))])
    return u * signs, s
