"""A randomized Tucker-2 of a LoRA-factored stack too large for float32, read in batches of layers.

The stack ``dW_l = s_l B_l A_l`` stays as given (e.g. bfloat16 factors, a zoo's 3,200 layers);
each pass reads one batch of layers at a time (runs of equal rank, at most ``batch_columns``
rank columns), stacked and cast to the compute dtype in one step per factor. With
``t_l = s_l sqrt(w_l)`` (``w_l`` the basis weights), the mode-1 unfolding ``[t_l B_l A_l]_l``
has the Gram matrix ``M_U = sum_l t_l^2 B_l (A_l A_l^T) B_l^T`` and mode 2
``M_V = sum_l t_l^2 A_l^T (B_l^T B_l) A_l``: only r x r Gram matrices of the factors and
``d x (L r)`` products are ever formed, never a ``d_out x d_in`` matrix or the 4096 x 51,200
unfolding. With ``k = r + oversample`` per mode:

1. *Norms*: the r x r Grams ``B_l^T B_l``, ``A_l A_l^T`` and every layer's ``||dW_l||^2``
   (:meth:`FactoredStack.norms_sq`, which the basis weights may depend on); finiteness.
2. *Sketch*: ``Y_U = sum_l B_l (t_l K_l Omega_l)`` with ``K_l K_l^T = A_l A_l^T`` and a Gaussian
   ``Omega_l`` (r, k): a Gaussian sketch of the unfolding, whose ``A_l Omega'_l`` has the law of
   ``K_l Omega_l``. ``Q_U = orth(Y_U)``; the same for V.
3. *Power passes* (``n_power``): ``Y_U = M_U Q_U``, one pass each; ``Q_U = orth(Y_U)``.
4. *Rayleigh-Ritz*: ``W_l = B_l^T Q_U`` (in the compute dtype, then float64) and
   ``Q_U^T M_U Q_U = sum_l t_l^2 W_l^T (A_l A_l^T) W_l`` (k x k, float64), whose leading
   eigenvectors ``E`` give ``U = Q_U E``. When ``k >= d`` the basis is the identity and this is
   the exact Gram route, the HOSVD up to round-off, with no sketch.

Then everything is small: ``U^T B_l = E^T W_l^T`` (r_out, r), the cores
``G_l = s_l (U^T B_l)(A_l V)``, and each layer's squared error ``||dW_l||^2 - ||G_l||^2`` (U and V
are orthonormal in float64). A layer fitted to within ``1e-8`` of its energy (``1e-4`` when the
compute dtype is float32), where that difference cancels, is recomputed in float64 from thin-QR
triangles (as
:func:`tensorlotr.relative_error_lowrank` does), with the factors as returned.

Cost: four passes over the factors for ``n_power=1`` (norms, sketch, power, Ritz) of
``2 d (L r) k`` flops per mode each (two for a power pass); memory: the factors as given, one batch of each factor,
``(L r) x k`` float64 per mode and the r x r Grams.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import tensorly as tl

from .backend import Array, Buffers, add_product, all_finite, as_float, backend_for, compute_dtype, float64_of, gaussian
from .linalg import triangle
from .lowrank import ScaleArg, check_factors, per_layer_floats, per_layer_sq, swap
from .tensor import Tucker2

#: A layer whose squared error is at most this share of its energy is recomputed from triangles,
#: by the compute dtype's precision: float64 (``||dW||^2 - ||G||^2`` exact to about 1e-14 of the
#: energy), else float32 (the Grams and projections, to about 1e-6).
CANCELLATION = 1e-8
CANCELLATION_FLOAT32 = 1e-4
#: Layers recomputed together by that check.
RECHECK_LAYERS = 32


def _cancellation(dtype: Any) -> float:
    return CANCELLATION if "float64" in str(dtype) else CANCELLATION_FLOAT32


@dataclass(frozen=True)
class _Run:
    """Layers ``start .. stop - 1``, all of rank ``rank``: one batch."""

    start: int
    stop: int
    rank: int

    @property
    def n(self) -> int:
        return self.stop - self.start


class FactoredFit(NamedTuple):
    """The result of :meth:`FactoredStack.tucker2`.

    Attributes
    ----------
    tucker : Tucker2
        ``core`` (L, r_out, r_in) at the layers' own scales (not the basis weights) and
        orthonormal factors, in the compute dtype and backend of the factors.
    residual_sq : numpy array (L,)
        ``||dW_l - U G_l V^T||_F^2`` per layer, float64.
    norm_sq : numpy array (L,)
        ``||dW_l||_F^2`` per layer, float64.
    route : str
        ``"exact Gram"`` when both modes took the identity basis, else
        ``"randomized (k=k_out x k_in, n power)"``.

    Examples
    --------
    Four rank-1 layers of 6 x 5 at rank 8, clipped to the full (6, 5): every layer is fitted exactly.

    >>> import numpy as np
    >>> rng = np.random.default_rng(1)
    >>> fit = FactoredStack(rng.standard_normal((4, 6, 1)), rng.standard_normal((4, 1, 5))).tucker2(8)
    >>> fit.tucker.rank, fit.route, fit.residual_sq.shape, bool(fit.residual_sq.max() < 1e-20 * fit.norm_sq.min())
    ((6, 5), 'exact Gram', (4,), True)
    """

    tucker: Tucker2
    residual_sq: np.ndarray
    norm_sq: np.ndarray
    route: str


class FactoredStack:
    """LoRA factors ``dW_l = s_l B_l A_l`` kept as given, for a Tucker-2 read in batches of layers.

    Parameters
    ----------
    B : array (L, d_out, r) or list of L arrays (d_out, r_l)
        Any floating dtype; bfloat16 and float16 are computed in float32 one batch at a time.
    A : array (L, r, d_in) or list of L arrays (r_l, d_in)
    scale : float or sequence of L floats
    batch_columns : int
        At most this many rank columns (``sum r_l`` over the batch) per batch.

    Examples
    --------
    Twelve rank-2 layers of 40 x 30 that share a (4, 3) basis, fitted at that rank:

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> u0, v0 = np.linalg.qr(rng.standard_normal((40, 4)))[0], np.linalg.qr(rng.standard_normal((30, 3)))[0]
    >>> bs = [u0 @ rng.standard_normal((4, 2)) for _ in range(12)]
    >>> as_ = [rng.standard_normal((2, 3)) @ v0.T for _ in range(12)]
    >>> fit = FactoredStack(bs, as_, 0.5, batch_columns=8).tucker2((4, 3), oversample=2)
    >>> fit.tucker.rank, fit.route, bool(fit.residual_sq.sum() < 1e-20 * fit.norm_sq.sum())
    ((4, 3), 'randomized (k=6x5, 1 power)', True)
    """

    def __init__(
        self,
        B: Array | Sequence[Array],
        A: Array | Sequence[Array],
        scale: ScaleArg = 1.0,
        *,
        batch_columns: int = 2048,
    ) -> None:
        self.bs, self.as_, self.scales = check_factors(B, A, scale)
        self.dtype = compute_dtype(self.bs[0])
        self.shape = (len(self.bs), int(self.bs[0].shape[0]), int(self.as_[0].shape[1]))
        self.ranks = [int(b.shape[1]) for b in self.bs]
        self.total_rank = sum(self.ranks)
        self.runs: list[_Run] = []
        start = 0
        for i in range(1, len(self.bs) + 1):
            size = (i - start) * self.ranks[start]
            if i == len(self.bs) or self.ranks[i] != self.ranks[start] or size + self.ranks[i] > batch_columns:
                self.runs.append(_Run(start, i, self.ranks[start]))
                start = i
        self._buffers = Buffers()
        self._grams: list[tuple[Array, Array]] | None = None  # (B^T B, A A^T) per run, compute dtype
        self._norms: np.ndarray | None = None

    def __len__(self) -> int:
        """L, the number of layers."""
        return self.shape[0]

    def _batches(self, dtype: Any) -> Iterator[tuple[_Run, Array, Array]]:
        """One pass: each run's ``B_l`` stacked (n, d_out, r) and ``A_l`` stacked (n, r, d_in), in ``dtype``.

        Each batch is one stack and one cast per factor into buffers that the next batch reuses
        (:class:`~tensorlotr.core.backend.Buffers`): the arrays are overwritten by the next batch.
        """
        for run in self.runs:
            yield (
                run,
                self._buffers.stack("B", self.bs[run.start : run.stop], dtype),
                self._buffers.stack("A", self.as_[run.start : run.stop], dtype),
            )

    def _check_finite(self, run: _Run, b3: Array, a3: Array) -> None:
        if all_finite(b3) and all_finite(a3):
            return
        for j, i in enumerate(range(run.start, run.stop)):
            for name, stacked in (("B", b3), ("A", a3)):
                if not all_finite(stacked[j]):
                    raise ValueError(f"{name}[{i}] contains NaN or Inf values")

    def norms_sq(self) -> np.ndarray:
        """``||dW_l||_F^2`` per layer (L,), float64, from the r x r Grams of the compute dtype (one pass).

        Checks the factors for NaN and Inf (``ValueError`` naming the layer); the Grams are kept
        for the sketch.
        """
        if self._norms is None:
            with backend_for(self.bs[0]):
                grams, norms = [], []
                for run, b3, a3 in self._batches(self.dtype):
                    self._check_finite(run, b3, a3)
                    gram_b, gram_a = _grams(b3, a3)
                    grams.append((gram_b, gram_a))
                    norms.append(_to_numpy(tl.sum(gram_b * gram_a, axis=(1, 2)), np.float64))
                self._grams = grams
                self._norms = np.concatenate(norms) * self.scales**2
        return self._norms

    def tucker2(
        self,
        rank: int | tuple[int, int],
        *,
        layer_weights: ScaleArg | None = None,
        oversample: int = 16,
        n_power: int = 1,
        seed: int = 0,
    ) -> FactoredFit:
        """The Tucker-2 at ``rank``, its bases fitted to ``sum_l w_l ||dW_l - U G_l V^T||^2`` (module docstring).

        Parameters
        ----------
        rank : int or (r_out, r_in)
            Clipped to ``min(d_out, L d_in)`` and ``min(d_in, L d_out)``.
        layer_weights : float or sequence of L floats, optional
            ``w_l >= 0`` for the bases (default 1); the cores always fit each layer exactly
            in the bases (``G_l = U^T dW_l V``).
        oversample : int
            Sketch columns beyond the rank, per mode.
        n_power : int
            Power passes per mode.
        seed : int
            Seeds the Gaussian sketches (one draw per batch and mode).

        Returns
        -------
        FactoredFit
        """
        n_layers, d_out, d_in = self.shape
        pair = (rank, rank) if isinstance(rank, int) else rank
        r_out, r_in = min(int(pair[0]), d_out, n_layers * d_in), min(int(pair[1]), d_in, n_layers * d_out)
        if min(r_out, r_in) <= 0 or oversample < 0 or n_power < 0:
            raise ValueError(f"rank must be positive and oversample, n_power >= 0; got {pair}, {oversample}, {n_power}")
        weights = np.ones(n_layers) if layer_weights is None else per_layer_floats(layer_weights, n_layers, "weights")
        if (weights < 0).any():
            raise ValueError("layer_weights must be >= 0")
        self.norms_sq()  # the Grams of the sketch
        basis_sq = self.scales**2 * weights  # t_l^2
        k_out, k_in = min(d_out, r_out + oversample), min(d_in, r_in + oversample)
        with backend_for(self.bs[0]):
            like = self.bs[0]
            q_out = _identity(d_out, like, self.dtype) if k_out == d_out else None
            q_in = _identity(d_in, like, self.dtype) if k_in == d_in else None
            if q_out is None or q_in is None:
                q_out, q_in = self._range(basis_sq, q_out, q_in, (k_out, k_in), n_power, seed)
            try:
                return self._finish(q_out, q_in, (r_out, r_in), basis_sq, n_power)
            finally:
                self._buffers.clear()

    def _range(
        self,
        basis_sq: np.ndarray,
        q_out: Array | None,
        q_in: Array | None,
        ks: tuple[int, int],
        n_power: int,
        seed: int,
    ) -> tuple[Array, Array]:
        """Steps 2 and 3: orthonormal ``Q_U`` (d_out, k_out) and ``Q_V`` (d_in, k_in); a given one is kept."""
        assert self._grams is not None
        _, d_out, d_in = self.shape
        todo = [mode for mode, q in ((0, q_out), (1, q_in)) if q is None]
        dims = (d_out, d_in)
        context = {**tl.context(self.bs[0]), "dtype": self.dtype}
        ys = {mode: tl.zeros((dims[mode], ks[mode]), **context) for mode in todo}
        for b, (run, b3, a3) in enumerate(self._batches(self.dtype)):
            t = _column(np.sqrt(basis_sq[run.start : run.stop]), b3)
            gram_b, gram_a = self._grams[b]
            for mode in todo:
                other = gram_a if mode == 0 else gram_b
                (omega,) = gaussian([(run.n, run.rank, ks[mode])], seed * 1_000_003 + 2 * b + mode, b3)
                x = tl.matmul(_sqrt_psd(other), omega) * t  # (n, r, k): A_l Omega_l in law, times t_l
                _accumulate(ys[mode], mode, b3, a3, x, self._buffers)
        qs = {mode: _orthonormal(ys[mode]) for mode in todo}
        for _ in range(n_power):
            ys = {mode: tl.zeros((dims[mode], ks[mode]), **context) for mode in todo}
            for b, (run, b3, a3) in enumerate(self._batches(self.dtype)):
                t_sq = _column(basis_sq[run.start : run.stop], b3)
                gram_b, gram_a = self._grams[b]
                for mode in todo:
                    x = tl.matmul(gram_a if mode == 0 else gram_b, _project(mode, b3, a3, qs[mode])) * t_sq
                    _accumulate(ys[mode], mode, b3, a3, x, self._buffers)
            qs = {mode: _orthonormal(ys[mode]) for mode in todo}
        return qs.get(0, q_out), qs.get(1, q_in)

    def _finish(
        self,
        q_out: Array,
        q_in: Array,
        ranks: tuple[int, int],
        basis_sq: np.ndarray,
        n_power: int,
    ) -> FactoredFit:
        """Step 4 and the cores and errors (module docstring).

        The projections ``B_l^T Q`` and ``A_l Q`` are taken in the compute dtype, one pass; the
        Ritz matrices, the cores and the errors in float64 from them and the cached Grams.
        """
        assert self._grams is not None and self._norms is not None
        f64 = float64_of(q_out)
        q_out, q_in = _orthonormal(as_float(q_out, f64)), _orthonormal(as_float(q_in, f64))
        work_out, work_in = as_float(q_out, self.dtype), as_float(q_in, self.dtype)
        k_out, k_in = int(q_out.shape[1]), int(q_in.shape[1])
        ritz_out = tl.zeros((k_out, k_out), **tl.context(q_out))
        ritz_in = tl.zeros((k_in, k_in), **tl.context(q_in))
        kept: list[tuple[Array, Array]] = []  # per run: W_B (n, r, k_out), W_A (n, r, k_in), float64
        for b, (run, b3, a3) in enumerate(self._batches(self.dtype)):
            gram_b, gram_a = (as_float(g, f64) for g in self._grams[b])
            w_b, w_a = as_float(_project(0, b3, a3, work_out), f64), as_float(_project(1, b3, a3, work_in), f64)
            t_sq = _column(basis_sq[run.start : run.stop], w_b)
            ritz_out += _ritz(w_b, tl.matmul(gram_a, w_b) * t_sq)
            ritz_in += _ritz(w_a, tl.matmul(gram_b, w_a) * t_sq)
            kept.append((w_b, w_a))
        e_out, e_in = _leading(ritz_out, ranks[0]), _leading(ritz_in, ranks[1])
        u, e_out = _signed(tl.dot(q_out, e_out), e_out)
        v, e_in = _signed(tl.dot(q_in, e_in), e_in)
        cores, residual = [], []
        for run in self.runs:  # each run's cores in float64, kept in the compute dtype
            w_b, w_a = kept.pop(0)
            s = _column(self.scales[run.start : run.stop], w_b)
            core = tl.matmul(swap(tl.matmul(w_b, e_out)), tl.matmul(w_a, e_in)) * s  # (n, r_out, r_in)
            norm = self._norms[run.start : run.stop]
            residual.append(np.maximum(norm - _to_numpy(per_layer_sq(core), np.float64), 0.0))
            cores.append(as_float(core, self.dtype))
        core = cores[0] if len(cores) == 1 else tl.concatenate(cores, axis=0)
        del cores
        tucker = Tucker2(core, as_float(u, self.dtype), as_float(v, self.dtype))
        norm_sq, residual_sq = self._norms.copy(), np.concatenate(residual)
        self._exact_where_cancelled(tucker, residual_sq, norm_sq)
        exact = k_out == self.shape[1] and k_in == self.shape[2]
        route = "exact Gram" if exact else f"randomized (k={k_out}x{k_in}, {n_power} power)"
        return FactoredFit(tucker, residual_sq, norm_sq, route)

    def _exact_where_cancelled(self, tucker: Tucker2, residual_sq: np.ndarray, norm_sq: np.ndarray) -> None:
        """Recompute, in place, the errors of the layers where ``||dW||^2 - ||G||^2`` cancels.

        From the factors as returned (rounded to the compute dtype), orthonormalised by thin
        QRs: the residual of a layer is ``||(I - P_U) dW_l||^2 + ||P_U dW_l (I - P_V)||^2 +
        ||Q_U^T dW_l Q_V - G'_l||^2``, each a small matrix of triangles.
        """
        flagged = residual_sq <= _cancellation(self.dtype) * norm_sq
        if not flagged.any():
            return
        f64 = float64_of(tucker.core)
        q_out, r_out = tl.qr(as_float(tucker.out_factor, f64))
        q_in, r_in = tl.qr(as_float(tucker.in_factor, f64))
        flagged_rows = [[i for i in range(run.start, run.stop) if flagged[i]] for run in self.runs]
        chunks = [rows[j : j + RECHECK_LAYERS] for rows in flagged_rows for j in range(0, len(rows), RECHECK_LAYERS)]
        for rows in chunks:  # a few layers at a time: (n, d, r) float64 and its thin QRs
            b = tl.stack([as_float(self.bs[i], f64) for i in rows])
            a = tl.stack([as_float(self.as_[i], f64) for i in rows])
            s = _column(self.scales[rows], b)
            c = tl.matmul(tl.transpose(q_out), b)  # (n, r_out, r)
            d = tl.matmul(a, q_in)  # (n, r, r_in)
            r_a = swap(triangle(swap(a)))
            r_b_perp = triangle(b - tl.matmul(q_out, c))
            r_a_perp = swap(triangle(swap(a) - tl.matmul(q_in, swap(d))))
            theirs = as_float(tl.stack([tucker.core[i] for i in rows]), f64)  # the cores as returned
            mine = tl.matmul(tl.matmul(r_out, theirs), tl.transpose(r_in))
            total = (
                per_layer_sq(tl.matmul(r_b_perp, r_a) * s)
                + per_layer_sq(tl.matmul(c, r_a_perp) * s)
                + per_layer_sq(tl.matmul(c, d) * s - mine)
            )
            residual_sq[rows] = _to_numpy(total, np.float64)


def _grams(b3: Array, a3: Array) -> tuple[Array, Array]:
    """``B_l^T B_l`` and ``A_l A_l^T`` (n, r, r) of a batch."""
    return tl.matmul(swap(b3), b3), tl.matmul(a3, swap(a3))


def _project(mode: int, b3: Array, a3: Array, q: Array) -> Array:
    """``B_l^T Q`` (mode 0) or ``A_l Q`` (mode 1) of a batch: (n, r, k) for ``q`` (d, k)."""
    if mode == 0:
        return tl.matmul(swap(b3), q)
    n, r, d_in = (int(x) for x in a3.shape)
    return tl.reshape(tl.dot(tl.reshape(a3, (n * r, d_in)), q), (n, r, -1))


def _accumulate(y: Array, mode: int, b3: Array, a3: Array, x: Array, buffers: Buffers) -> None:
    """``y += sum_l B_l x_l`` (mode 0, y (d_out, k)) or ``y += sum_l A_l^T x_l`` (mode 1, y (d_in, k)), x (n, r, k)."""
    n, r, k = (int(s) for s in x.shape)
    if mode == 0:
        buffers.sum_products(y, b3, x)
    else:
        add_product(y, tl.transpose(tl.reshape(a3, (n * r, -1))), tl.reshape(x, (n * r, k)))


def _ritz(w: Array, x: Array) -> Array:
    """``sum_l w_l^T x_l`` (k, k) of two stacks (n, r, k)."""
    k = int(w.shape[2])
    return tl.dot(tl.transpose(tl.reshape(w, (-1, k))), tl.reshape(x, (-1, k)))


def _column(values: np.ndarray, like: Array) -> Array:
    """``values`` (n,) as an (n, 1, 1) array of the dtype and backend of ``like``."""
    return tl.reshape(tl.tensor(np.ascontiguousarray(values), **tl.context(like)), (-1, 1, 1))


def _to_numpy(x: Array, dtype: Any) -> np.ndarray:
    return np.asarray(tl.to_numpy(x), dtype=dtype)


def _identity(d: int, like: Array, dtype: Any) -> Array:
    return tl.eye(d, **{**tl.context(like), "dtype": dtype})


def _orthonormal(y: Array) -> Array:
    q, _ = tl.qr(y)
    return q


def _sqrt_psd(gram: Array) -> Array:
    """``K`` with ``K K^T = gram`` for a stack of symmetric PSD matrices (n, r, r): ``E diag(sqrt(lambda))``."""
    values, vectors = tl.eigh(gram)
    return vectors * tl.sqrt(tl.clip(values, 0, None))[:, None, :]


def _leading(gram: Array, rank: int) -> Array:
    """The ``rank`` leading eigenvectors (k, rank) of a symmetric matrix, largest first."""
    _, vectors = tl.eigh(gram)
    k = int(vectors.shape[1])
    return tl.flip(vectors[:, k - rank :], axis=1)


def _signed(basis: Array, small: Array) -> tuple[Array, Array]:
    """``basis`` and ``small`` with each column's sign chosen so that its largest entry in ``basis`` is positive."""
    rows = tl.argmax(tl.abs(basis), axis=0)
    signs = tl.sign(basis[rows, tl.arange(int(basis.shape[1]))])
    signs = tl.where(signs == 0, tl.ones(signs.shape, **tl.context(signs)), signs)
    return basis * signs, small * signs
