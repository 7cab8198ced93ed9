"""Output-aware Tucker-2 of a LoRA-factored stack: a weighted HOOI.

A layer's update matters through what it does to the layer's inputs ``x``: the output error
of ``dW_l`` replaced by ``U G_l V^T`` over inputs with second moment ``C_l = E[x x^T]`` is
``||(dW_l - U G_l V^T) C_l^{1/2}||_F^2``. :func:`tucker2_weighted` minimises

    f(U, G, V) = sum_l w_l ||(dW_l - U G_l V^T) W_l^{1/2}||_F^2,   W_l = C_l + delta_l I,

over orthonormal ``U`` (d_out, r_out) and ``V`` (d_in, r_in) shared by the layers and a core
``G_l`` per layer, with ``dW_l = s_l B_l A_l`` given as LoRA factors. ``C_l = Z_l Z_l^T`` is given
by any factor ``Z_l`` (d_in, k_l): ``C_l^{1/2}``, the centred inputs themselves, or a low-rank
sketch. The damping ``delta_l = damping * trace(C_l) / d_in`` (as GPTQ damps its Hessian)
keeps every ``W_l`` positive definite, so directions the calibration never excited still
cost a little; ``w_l`` are optional per-layer weights (the zoo weights adapters with them).

The algorithm (alternating closed-form updates; each step lowers ``f``):

- **cores** for fixed ``U``, ``V``: ``G_l = s_l (U^T B_l)(A_l W_l V) H_l^+`` with
  ``H_l = V^T W_l V`` (r_in x r_in), the weighted least-squares fit of each layer;
- **U** for fixed ``V`` (cores optimal): the leading ``r_out`` left singular vectors of the
  weighted stack ``[s_l B_l (A_l W_l V) H_l^{-1/2}]_l`` (d_out x L r_in);
- **V** for fixed ``U`` and cores: the least-squares problem
  ``min_V sum_l w_l ||(U^T dW_l - G_l V^T) W_l^{1/2}||^2``, whose normal equations
  ``sum_l w_l W_l V G_l^T G_l = sum_l w_l W_l dW_l^T U G_l`` couple ``V``'s columns through
  the different ``W_l``; they are solved by preconditioned conjugate gradients, warm-started
  at the current ``V``, with the Kronecker preconditioner ``mean(W_l) ⊗ sum_l w_l G_l^T G_l``
  (exact when all ``C_l`` are equal). CG lowers the quadratic at every iteration, so a
  partial solve is still a descent step. ``V`` is then re-orthonormalised (its triangle goes
  into the cores), and ``U`` and the cores are updated.

Start: the better (lower ``f``) of two initialisations, the HOSVD of the whitened stack
``[s_l B_l (A_l W̄^{1/2})]_l`` (a LoRA again) with ``V = W̄^{-1/2} Ṽ``, which is the HOSVD
solution when all ``W_l`` equal their mean ``W̄``, and the plain HOSVD's ``V``; each is
completed with the weighted ``U`` and cores. Convergence: a sweep is kept only if ``f``
falls, and sweeps stop when ``f`` falls by less than ``tol`` times the weighted norm of the
stack, or after ``n_iter`` sweeps. ``f`` is computed without cancellation from thin-QR
triangles of ``[B_l, U]``.

Cost per sweep, for L layers of rank r, k = the columns of the ``Z`` (shared ``Z`` are
counted once, as in a zoo where every adapter's layer l sees the same inputs), m CG steps:
``O(L (d r k + d r_out^2) + d_out (L r_in)^2 + m (d k r_in + d_in^2 r_in))``. Nothing of size
``d_out x d_in`` is formed; the largest arrays are ``mean(W_l)``'s eigenvectors (d_in x d_in at most).
At full rank the stack is reproduced exactly: ``V`` spans the rows of every ``dW_l`` and each
``W_l`` is positive definite, so the weighted fit is the exact one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import tensorly as tl

from .backend import Array, backend_for, backend_name, check_finite, check_ndim, small_lapack_calls, to_float
from .hosvd import tucker2_lowrank
from .lowrank import per_layer_floats
from .svd import LeftSingular, RankArg, check_common
from .tensor import Tucker2

WeightArg = Array | Sequence[Array]
#: Eigenvalues below this share of the largest are treated as zero in pseudo-inverses.
_CUTOFF = 1e-12


def _f64(x: Array) -> Array:
    if backend_name(x) == "pytorch":
        import torch

        return x.detach().to(torch.float64)
    return np.asarray(x, dtype=np.float64)


def _t(x: Array) -> Array:
    return tl.transpose(x)


def _sq(x: Array) -> float:
    return to_float(tl.sum(x * x))


def _triangle(x: Array) -> Array:
    """``R`` of the thin QR of ``x`` (m, n): ``||x M|| = ||R M||`` for any ``M``."""
    return tl.qr(x)[1]


def _eig_apply(vectors: Array, values: Array, power: float, x: Array, rest: float | None = None) -> Array:
    """``S^power @ x`` for ``S = E diag(values) E^T + rest (I - E E^T)``, ``E = vectors`` orthonormal (d, m).

    Eigenvalues below the cutoff count as zero (a pseudo-inverse for negative powers); ``rest``
    is the eigenvalue of the complement of ``E``'s columns (None when they span everything).
    """
    cutoff = _CUTOFF * max(to_float(tl.max(values)), rest or 0.0, 0.0)
    keep = values > cutoff
    safe = tl.clip(values, max(cutoff, np.finfo(float).tiny), None)
    projected = tl.dot(_t(vectors), x)
    out = tl.dot(vectors * ((safe**power) * keep), projected)
    if rest is not None and rest > cutoff:
        out = out + rest**power * (x - tl.dot(vectors, projected))
    return out


@dataclass(frozen=True)
class Eig:
    """A symmetric matrix ``S = E diag(values) E^T + rest (I - E E^T)``, ``E`` orthonormal (d, m).

    ``rest`` is the eigenvalue of the complement of ``E``'s columns (None when they span everything).
    """

    vectors: Array
    values: Array
    rest: float | None

    def power_times(self, power: float, x: Array) -> Array:
        """``S^power @ x``; see :func:`_eig_apply`."""
        return _eig_apply(self.vectors, self.values, power, x, self.rest)


@dataclass(frozen=True)
class _Projections:
    """The weighted products of the layers for one ``V`` (see :meth:`_Layers.projections`).

    ``awv[l]`` is ``A_l W_l V`` (r_l, r_in); ``h_pinv[j]`` and ``h_half[j]`` are ``H^+`` and
    ``H^{+1/2}`` of ``H = V^T W V`` (r_in, r_in), per distinct ``Z`` (layer l uses ``Z`` number ``zid[l]``).
    """

    awv: list[Array]
    h_pinv: list[Array]
    h_half: list[Array]


class _Layers:
    """The stack as per-layer float64 arrays, with the weights grouped by distinct ``Z``.

    ``b[l]`` (d_out, r_l), ``a[l]`` (r_l, d_in), ``s[l]``, ``w[l]`` (layer weight), ``zid[l]``
    (index into ``z``); ``z[j]`` (d_in, k_j) with damping ``delta[j]``; ``az[l] = a[l] z[zid[l]]``.
    """

    def __init__(
        self,
        B: Array | Sequence[Array],
        A: Array | Sequence[Array],
        scale: float | Sequence[float] | Array,
        weights: WeightArg,
        layer_weights: Sequence[float] | Array | None,
        damping: float,
    ) -> None:
        self.b = [_f64(x) for x in _per_layer(B)]
        self.a = [_f64(x) for x in _per_layer(A)]
        n_layers = len(self.b)
        self.s = per_layer_floats(scale, n_layers, "scale")
        self.w = per_layer_floats(1.0 if layer_weights is None else layer_weights, n_layers, "layer_weights")
        if (self.w < 0).any():
            raise ValueError(f"layer_weights must be >= 0, got {self.w.tolist()}")
        self.d_out, self.d_in = int(self.b[0].shape[0]), int(self.a[0].shape[1])
        zs = [weights] * n_layers if _is_matrix(weights) else _per_layer(weights)
        if len(zs) != n_layers:
            raise ValueError(f"weights has {len(zs)} layers but the LoRA factors have {n_layers}")
        self.z: list[Array] = []
        self.zid: list[int] = []
        seen: dict[int, int] = {}
        for i, z in enumerate(zs):
            if id(z) not in seen:
                check_ndim(z, 2, f"weights[{i}]", "(d_in, k)")
                if int(z.shape[0]) != self.d_in:
                    raise ValueError(f"weights[{i}] has {z.shape[0]} rows but the layers' d_in is {self.d_in}")
                if backend_name(z) != backend_name(self.b[0]):
                    raise ValueError(
                        f"weights[{i}] is a {backend_name(z)} array but the LoRA factors are {backend_name(self.b[0])}"
                    )
                check_finite(z, f"weights[{i}]")
                seen[id(z)] = len(self.z)
                self.z.append(_f64(z))
            self.zid.append(seen[id(z)])
        traces = np.array([_sq(z) / self.d_in for z in self.z])
        if not traces.max() > 0:
            raise ValueError("the calibration weights are all zero: no layer saw any input")
        fallback = float(traces[traces > 0].mean())
        self.delta = [float(damping) * (t if t > 0 else fallback) for t in traces]
        self.az = [tl.dot(a, self.z[j]) for a, j in zip(self.a, self.zid, strict=True)]

    def __len__(self) -> int:
        return len(self.b)

    # --- the weighted products for a given V ------------------------------------------
    def projections(self, v: Array) -> _Projections:
        """Per layer ``A_l W_l V`` (r_l, r_in); per distinct ``Z``: ``H^+`` and ``H^{+1/2}`` of ``H = V^T W V``."""
        zv = [tl.dot(_t(z), v) for z in self.z]
        gram = tl.dot(_t(v), v)
        h_pinv, h_half = [], []
        for j, x in enumerate(zv):
            values, vectors = tl.eigh(tl.dot(_t(x), x) + self.delta[j] * gram)
            eye = tl.eye(int(gram.shape[0]), **tl.context(gram))
            h_pinv.append(_eig_apply(vectors, values, -1.0, eye))
            h_half.append(_eig_apply(vectors, values, -0.5, eye))
        awv = [
            tl.dot(az, zv[j]) + self.delta[j] * tl.dot(a, v) for a, az, j in zip(self.a, self.az, self.zid, strict=True)
        ]
        return _Projections(awv, h_pinv, h_half)

    def cores(self, u: Array, v: Array) -> Array:
        """The optimal cores for ``U``, ``V``: ``G_l = s_l (U^T B_l)(A_l W_l V) H_l^+``, shape (L, r_out, r_in)."""
        p = self.projections(v)
        return tl.stack(
            [
                self.s[i] * tl.dot(tl.dot(_t(u), self.b[i]), tl.dot(p.awv[i], p.h_pinv[self.zid[i]]))
                for i in range(len(self))
            ]
        )

    def update_out(self, v: Array, r_out: int) -> Array:
        """``U``: left singular vectors of ``[sqrt(w_l) s_l B_l (A_l W_l V) H_l^{-1/2}]_l``."""
        p = self.projections(v)
        columns = [
            float(np.sqrt(self.w[i])) * self.s[i] * tl.dot(self.b[i], tl.dot(p.awv[i], p.h_half[self.zid[i]]))
            for i in range(len(self))
        ]
        return LeftSingular(tl.concatenate(columns, axis=1)).basis(r_out)

    # --- the V step: preconditioned conjugate gradients ----------------------------------
    def update_in(self, u: Array, cores: Array, v: Array, mean_w: Eig, n_cg: int, cg_tol: float) -> Array:
        """The least-squares ``V`` (d_in, r_in) for fixed ``U`` and cores, by PCG from ``v``."""
        r_in = int(v.shape[1])
        grams = [self.w[i] * tl.dot(_t(cores[i]), cores[i]) for i in range(len(self))]  # w_l G_l^T G_l
        per_z = [0.0 * grams[0] for _ in self.z]
        damped = 0.0 * grams[0]
        rhs = tl.zeros(tuple(v.shape), **tl.context(v))
        for i, gram in enumerate(grams):
            j = self.zid[i]
            per_z[j] = per_z[j] + gram
            damped = damped + self.delta[j] * gram
            c = self.w[i] * self.s[i] * tl.dot(tl.dot(_t(self.b[i]), u), cores[i])  # (r_l, r_in)
            rhs = rhs + tl.dot(self.z[j], tl.dot(_t(self.az[i]), c)) + self.delta[j] * tl.dot(_t(self.a[i]), c)

        def operator(x: Array) -> Array:  # sum_l w_l W_l X G_l^T G_l
            out = tl.dot(x, damped)
            for z, k in zip(self.z, per_z, strict=True):
                out = out + tl.dot(z, tl.dot(tl.dot(_t(z), x), k))
            return out

        k_sum = sum(grams)
        ridge = 1e-10 * max(to_float(tl.trace(k_sum)) / r_in, np.finfo(float).tiny)
        k_values, k_vectors = tl.eigh(k_sum + ridge * tl.eye(r_in, **tl.context(v)))

        def precondition(x: Array) -> Array:  # mean(W)^-1 X (sum_l w_l G_l^T G_l)^-1
            return _t(_eig_apply(k_vectors, k_values, -1.0, _t(mean_w.power_times(-1.0, x))))

        x = v
        residual = rhs - operator(x)
        target = cg_tol * max(_sq(rhs) ** 0.5, np.finfo(float).tiny)
        p = precondition(residual)
        rz = to_float(tl.sum(residual * p))
        for _ in range(n_cg):
            if _sq(residual) ** 0.5 <= target or rz <= 0:
                break
            ap = operator(p)
            curvature = to_float(tl.sum(p * ap))
            if curvature <= 0:
                break
            step = rz / curvature
            x = x + step * p
            residual = residual - step * ap
            z = precondition(residual)
            rz_next = to_float(tl.sum(residual * z))
            p = z + (rz_next / rz) * p
            rz = rz_next
        return x

    # --- the objective ---------------------------------------------------------------
    def residuals(self, u: Array, cores: Array, v: Array, damped: bool) -> tuple[np.ndarray, np.ndarray]:
        """Per layer ``||(dW_l - U G_l V^T) W^{1/2}||^2`` and ``||dW_l W^{1/2}||^2`` (no ``w_l``).

        ``W = Z Z^T`` (the calibrated output error) or, with ``damped``, ``Z Z^T + delta I``.
        Both come from the triangle of ``[B_l, U]``, so nothing cancels.
        """
        res, ref = np.zeros(len(self)), np.zeros(len(self))
        for i in range(len(self)):
            j = self.zid[i]
            t = _triangle(tl.concatenate([self.b[i], u], axis=1))
            diff = tl.dot(t, tl.concatenate([self.s[i] * self.a[i], -tl.dot(cores[i], _t(v))], axis=0))
            whole = self.s[i] * tl.dot(_triangle(self.b[i]), self.a[i])
            res[i] = _sq(tl.dot(diff, self.z[j]))
            ref[i] = _sq(tl.dot(whole, self.z[j]))
            if damped:
                res[i] += self.delta[j] * _sq(diff)
                ref[i] += self.delta[j] * _sq(whole)
        return res, ref

    def objective(self, u: Array, cores: Array, v: Array) -> float:
        res, _ = self.residuals(u, cores, v, damped=True)
        return float(self.w @ res)

    def mean_weight(self) -> Eig:
        """``W̄ = sum_l w_l W_l / sum_l w_l`` (damping included), an :class:`Eig`.

        When the distinct ``Z`` have fewer columns than ``d_in`` in all, ``E`` is thin (d_in, m)
        and the rest of the space has eigenvalue ``rest`` (the mean damping); nothing is d_in x d_in.
        """
        weights = self.w if self.w.sum() > 0 else np.ones(len(self))
        share = np.zeros(len(self.z))
        for i, j in enumerate(self.zid):
            share[j] += weights[i] / weights.sum()
        stacked = tl.concatenate([float(np.sqrt(c)) * z for c, z in zip(share, self.z, strict=True) if c > 0], axis=1)
        delta = float(share @ np.asarray(self.delta))
        if int(stacked.shape[1]) >= self.d_in:
            values, vectors = tl.eigh(tl.dot(stacked, _t(stacked)) + delta * tl.eye(self.d_in, **tl.context(stacked)))
            return Eig(vectors, values, None)
        q, r = tl.qr(stacked)  # stacked stacked^T = Q (R R^T) Q^T
        values, vectors = tl.eigh(tl.dot(r, _t(r)))
        return Eig(tl.dot(q, vectors), values + delta, delta)


def _is_matrix(x: WeightArg) -> bool:
    return not isinstance(x, Sequence) and len(x.shape) == 2


def _per_layer(x: Array | Sequence[Array]) -> list[Array]:
    if isinstance(x, Sequence):
        return list(x)
    return [x[i] for i in range(int(x.shape[0]))]


def tucker2_weighted(
    B: Array | Sequence[Array],
    A: Array | Sequence[Array],
    weights: WeightArg,
    rank: RankArg = None,
    *,
    scale: float | Sequence[float] | Array = 1.0,
    layer_weights: Sequence[float] | Array | None = None,
    energy: float | None = None,
    damping: float = 1e-2,
    n_iter: int = 10,
    tol: float = 1e-6,
    cg_iter: int = 30,
    cg_tol: float = 1e-3,
) -> Tucker2:
    """Tucker-2 of ``dW_l = s_l B_l A_l`` that minimises the calibrated output error (see the module doc).

    Parameters
    ----------
    B : array (L, d_out, r) or list of L arrays (d_out, r_l)
        LoRA up-projections.
    A : array (L, r, d_in) or list of L arrays (r_l, d_in)
        LoRA down-projections.
    weights : array (d_in, k), array (L, d_in, k) or list of L arrays (d_in, k_l)
        ``Z_l`` with ``C_l = Z_l Z_l^T``, the second moment of layer l's inputs (one array:
        the same for every layer). The same array object listed for several layers is
        processed once. On the backend of ``B`` and ``A``.
    rank : int or (r_out, r_in), optional
        Tucker ranks; ``None`` keeps the exact rank (``min(d, sum_l r_l)`` per mode), lossless.
    scale : float or sequence of L floats
        ``s_l``; the cores absorb it.
    layer_weights : sequence of L floats >= 0, optional
        ``w_l``, a weight on each layer's term (default 1).
    energy : float in (0, 1], optional
        Per mode, the smallest rank keeping this share of the whitened stack's squared
        singular values (the calibrated output energy); ``rank`` then caps it.
    damping : float >= 0
        ``delta_l = damping * trace(C_l) / d_in``. With 0 and a rank-deficient ``C_l`` the
        cores are the minimum-norm fits.
    n_iter : int
        Weighted HOOI sweeps at most; 0 keeps the better initialisation.
    tol : float
        Stop when a sweep lowers ``f`` by less than ``tol`` times the weighted norm of the stack.
    cg_iter, cg_tol : int, float
        Conjugate-gradient steps at most per V update, and their relative residual target.

    Returns
    -------
    Tucker2
        ``core`` (L, r_out, r_in) and orthonormal ``out_factor`` (d_out, r_out) and
        ``in_factor`` (d_in, r_in), on the backend of ``B``, in float64.

    Raises
    ------
    ValueError
        For factors that :func:`tensorlotr.tucker2_lowrank` refuses, weights of the wrong
        shape, layer count or backend, NaN or Inf weights, negative ``damping`` or
        ``layer_weights``, or weights that are all zero.
    """
    check_common(rank, energy, n_iter)
    if not float(damping) >= 0:
        raise ValueError(f"damping must be >= 0, got {damping!r}")
    plain = tucker2_lowrank(B, A, rank, scale=scale, energy=energy)  # validates the factors
    first = B if not isinstance(B, (list, tuple)) else B[0]
    with backend_for(first), small_lapack_calls(first):
        layers = _Layers(B, A, scale, weights, layer_weights, damping)
        mean_w = layers.mean_weight()
        w_half = [_t(mean_w.power_times(0.5, _t(a))) for a in layers.a]  # A_l W̄^{1/2}
        whitened = tucker2_lowrank(layers.b, w_half, rank, scale=layers.s, energy=energy)
        r_out, r_in = whitened.rank
        if plain.rank != (r_out, r_in):
            plain = tucker2_lowrank(layers.b, layers.a, (r_out, r_in), scale=layers.s)
        starts = [mean_w.power_times(-0.5, _f64(whitened.in_factor)), _f64(plain.in_factor)]
        best: tuple[float, Array, Array, Array] | None = None
        for start in starts:
            v = tl.qr(start)[0]
            u = layers.update_out(v, r_out)
            cores = layers.cores(u, v)
            value = layers.objective(u, cores, v)
            if best is None or value < best[0]:
                best = (value, u, cores, v)
        assert best is not None
        value, u, cores, v = best
        _, ref = layers.residuals(u, cores, v, damped=True)
        total = float(layers.w @ ref)
        for _ in range(int(n_iter)):
            x = layers.update_in(u, cores, v, mean_w, cg_iter, cg_tol)
            new_v = tl.qr(x)[0]
            new_u = layers.update_out(new_v, r_out)
            new_cores = layers.cores(new_u, new_v)
            new_value = layers.objective(new_u, new_cores, new_v)
            if not new_value < value:
                break
            improvement = value - new_value
            u, cores, v, value = new_u, new_cores, new_v, new_value
            if improvement <= tol * max(total, np.finfo(float).tiny):
                break
        return Tucker2(cores, u, v)


def weighted_residuals_lowrank(
    tucker: Tucker2,
    B: Array | Sequence[Array],
    A: Array | Sequence[Array],
    weights: WeightArg,
    scale: float | Sequence[float] | Array = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Per layer, the calibrated output error and energy: ``||(dW_l - U G_l V^T) Z_l||^2`` and ``||dW_l Z_l||^2``.

    Parameters
    ----------
    tucker : Tucker2
        Approximation of shape (L, d_out, d_in); its factors need not be orthonormal.
    B, A, weights, scale
        As in :func:`tucker2_weighted`.

    Returns
    -------
    residual_sq, reference_sq : numpy arrays, shape (L,)
        Exact (from thin-QR triangles, nothing cancels), in float64.
    """
    first = B if not isinstance(B, (list, tuple)) else B[0]
    with backend_for(first), small_lapack_calls(first):
        layers = _Layers(B, A, scale, weights, None, 0.0)
        if (len(layers), layers.d_out, layers.d_in) != tucker.shape:
            raise ValueError(
                f"LoRA factors describe a stack of shape {(len(layers), layers.d_out, layers.d_in)} "
                f"but the Tucker2 has shape {tucker.shape}"
            )
        core, u, v = (_f64(x) for x in tucker)
        return layers.residuals(u, core, v, damped=False)


def weighted_error_lowrank(
    tucker: Tucker2,
    B: Array | Sequence[Array],
    A: Array | Sequence[Array],
    weights: WeightArg,
    scale: float | Sequence[float] | Array = 1.0,
) -> float:
    """The relative calibrated output error ``sqrt(sum_l ||(dW_l - U G_l V^T) Z_l||^2 / sum_l ||dW_l Z_l||^2)``.

    0.0 when both are zero, ``inf`` when only the reference is. Arguments as in
    :func:`weighted_residuals_lowrank`.
    """
    res, ref = weighted_residuals_lowrank(tucker, B, A, weights, scale)
    if ref.sum() == 0.0:
        return 0.0 if res.sum() == 0.0 else float("inf")
    return float(np.sqrt(res.sum() / ref.sum()))
