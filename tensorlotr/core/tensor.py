"""The Tucker-2 tensor: a stack of L matrices dW_l = U G_l V^T with shared factors."""

from __future__ import annotations

from collections.abc import Iterator

import tensorly as tl

from .backend import Array, backend_for, check_ndim, to_float
from .contract import RECONSTRUCT, TUCKER_NORM_SQ, contract
from .svd import RankArg, dense_tucker2


class Tucker2:
    """A layer-first stack ``(L, d_out, d_in)`` in Tucker-2 form, ``dW_l = U @ G_l @ V.T``.

    The layer mode is never compressed: every layer owns its core ``G_l``, and the two
    factors are shared by all layers. After a decomposition both factors have
    orthonormal columns. The arrays may be numpy arrays or torch tensors; operations
    run on the tensorly backend that matches them.

    Parameters
    ----------
    core : array, shape (L, r_out, r_in)
        The per-layer cores ``G_l``.
    out_factor : array, shape (d_out, r_out)
        ``U``, shared by all layers.
    in_factor : array, shape (d_in, r_in)
        ``V``, shared by all layers.
    """

    __slots__ = ("core", "in_factor", "out_factor")

    def __init__(self, core: Array, out_factor: Array, in_factor: Array) -> None:
        check_ndim(core, 3, "core", "(L, r_out, r_in)")
        check_ndim(out_factor, 2, "out_factor", "(d_out, r_out)")
        check_ndim(in_factor, 2, "in_factor", "(d_in, r_in)")
        if out_factor.shape[1] != core.shape[1] or in_factor.shape[1] != core.shape[2]:
            raise ValueError(
                f"factor ranks do not match the core: core {tuple(core.shape)}, "
                f"out_factor {tuple(out_factor.shape)}, in_factor {tuple(in_factor.shape)}"
            )
        self.core = core
        self.out_factor = out_factor
        self.in_factor = in_factor

    @property
    def rank(self) -> tuple[int, int]:
        """``(r_out, r_in)``."""
        return int(self.core.shape[1]), int(self.core.shape[2])

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(L, d_out, d_in)`` of the stack this tensor represents."""
        return int(self.core.shape[0]), int(self.out_factor.shape[0]), int(self.in_factor.shape[0])

    @property
    def n_params(self) -> int:
        """Stored parameters: ``r_out*d_out + r_in*d_in + L*r_out*r_in``."""
        n_layers, d_out, d_in = self.shape
        r_out, r_in = self.rank
        return r_out * d_out + r_in * d_in + n_layers * r_out * r_in

    def __iter__(self) -> Iterator[Array]:  # allows ``core, U, V = tucker``, as tensorly's TuckerTensor
        return iter((self.core, self.out_factor, self.in_factor))

    def __repr__(self) -> str:
        return f"Tucker2(shape={self.shape}, rank={self.rank})"

    def to_dense(self) -> Array:
        """The full stack, shape ``(L, d_out, d_in)``."""
        return contract(RECONSTRUCT, self.out_factor, self.core, self.in_factor)

    def norm(self) -> float:
        """Frobenius norm of the full stack, computed without forming it."""
        with backend_for(self.core):
            gram_out = tl.dot(tl.transpose(self.out_factor), self.out_factor)
            gram_in = tl.dot(tl.transpose(self.in_factor), self.in_factor)
            sq = contract(TUCKER_NORM_SQ, self.core, gram_out, self.core, gram_in)
            return float(max(to_float(sq), 0.0) ** 0.5)

    def truncate(self, rank: RankArg = None, energy: float | None = None) -> Tucker2:
        """A Tucker-2 of smaller rank: the HOSVD of this tensor at ``rank`` or ``energy``.

        The factors are orthonormalised first, so the result is the same as decomposing
        the dense stack directly at the smaller rank. A rank larger than the current one
        is clipped to it. See :func:`tensorlotr.tucker2` for ``rank`` and ``energy``.
        """
        with backend_for(self.core):
            q_out, r_out = tl.qr(self.out_factor)
            q_in, r_in = tl.qr(self.in_factor)
            small = contract("po,loi,qi->lpq", r_out, self.core, r_in)
            core, out_factor, in_factor = dense_tucker2(small, rank, energy, 0, 0.0)
            return Tucker2(core, tl.dot(q_out, out_factor), tl.dot(q_in, in_factor))
