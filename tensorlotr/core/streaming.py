"""Tucker-2 of a stack too large to hold: the layers are read one at a time, in passes.

- **Exact route** (``max(d_out, d_in) <= gram_max_dim``): pass 1 accumulates the Gram
  matrices ``sum_l dW_l dW_l^T`` and ``sum_l dW_l^T dW_l`` in float64; their eigenvectors
  are the HOSVD factors. Pass 2 forms the cores ``G_l = U^T dW_l V``. Each HOOI sweep adds
  two passes. Memory: two d x d Grams plus one layer.
- **Randomized route** (larger d), ``k_in = r_in + oversample`` and ``k_out = r_out + oversample``:

  1. *Sketch*: ``Y_in = sum_l dW_l^T Psi_l`` with a Gaussian ``Psi_l`` (d_out, k_in) drawn
     per layer, and every layer's squared norm; ``Q_in = orth(Y_in)``.
  2. *Power passes* (``n_power``, default 1): ``X_l = dW_l Q_in`` for every layer, kept side
     by side (d_out, L k_in), and ``Y_in = sum_l dW_l^T X_l`` (a power iteration of mode 2);
     ``Q_in = orth(Y_in)``. After the last one, ``Q_out`` is the dominant left subspace of
     ``[X_1, ..., X_L]``: HOOI's update of U, found in memory (a Gaussian sketch with two
     power iterations; projecting onto ``Q_in`` has already cut the noise to ``k_in / d_in``).
     With ``n_power=0`` the sketch pass also forms ``Y_out = sum_l dW_l Omega_l`` and
     ``Q_out = orth(Y_out)``.
  3. *Project*: ``S_l = Q_out^T dW_l Q_in`` (k_out, k_in), and the small stack is decomposed
     in memory with :func:`tensorlotr.tucker2` (HOOI sweeps included).

  Each layer is multiplied by a thin matrix 4 times with the default single power pass
  (1 + 2 + 1), read block by block; products accumulate in place. Memory: O(d k) plus
  ``X`` (L d_out k_in) plus ``S`` (L k_out k_in) plus one block.

The core knows nothing of files: the caller supplies a :class:`LayerStack`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Protocol, TypeVar

import tensorly as tl

from .backend import Array, add_product, as_float, backend_for, float64_of, gaussian, to_float
from .hosvd import tucker2
from .svd import choose_rank
from .tensor import Tucker2

_T = TypeVar("_T")
#: A layer's delta as ``(first row, block of rows x d_in)`` pieces, produced on each call.
Blocks = Callable[[], Iterable[tuple[int, Array]]]


class Progress(Protocol):
    """``progress(items, description, total)`` returns an iterable over ``items``, as tqdm does.

    ``total`` is the number of items, or None when it is not known (as in ``tensorlotr.progress``).
    """

    def __call__(self, items: Iterable[_T], desc: str, total: int | None, /) -> Iterable[_T]:
        """Iterate over ``items`` (``total`` of them), reporting under ``desc``."""


class LayerStack(Protocol):
    """A stack of L matrices ``(d_out, d_in)`` that is read one layer at a time, in passes.

    Arrays are numpy arrays or torch tensors of ``dtype``; a yielded array may be a
    buffer that the next one overwrites.
    """

    #: The compute dtype of the yielded arrays (float32 or float64, numpy or torch).
    dtype: Any

    def __len__(self) -> int:
        """L, the number of layers."""

    def layers(self, progress: Progress, desc: str) -> Iterable[tuple[int, Array]]:
        """One pass: ``(i, dW_i)`` with ``dW_i`` of shape (d_out, d_in), for i = 0 .. L-1."""

    def layer_blocks(self, progress: Progress, desc: str) -> Iterable[tuple[int, Blocks]]:
        """One pass: ``(i, blocks)``, where ``blocks()`` yields ``dW_i`` as row blocks; it may be called again."""

    def check_finite(self, i: int, norm_sq: float) -> float:
        """``norm_sq`` (``||dW_i||^2``, from the first pass), or an error naming layer i if it is not finite."""


def _no_progress(items: Iterable[_T], _desc: str, _total: int | None) -> Iterable[_T]:
    return items


def _norm_sq(matrix: Array, rows: int = 256) -> float:
    """``||matrix||_F^2`` summed in float64, a block of rows at a time (no full float64 copy).

    NaN or Inf anywhere makes it non-finite, which is how the first pass checks each layer.
    """
    return sum(
        to_float(tl.sum(as_float(matrix[start : start + rows], float64_of(matrix)) ** 2))
        for start in range(0, int(matrix.shape[0]), rows)
    )


def _eigen(gram: Array) -> tuple[Array, Array]:
    """Eigenvalues in decreasing order (clipped at 0) and their eigenvectors (columns)."""
    values, vectors = tl.eigh(gram)
    return tl.clip(tl.flip(values, axis=0), 0, None), tl.flip(vectors, axis=1)


def _orthonormal(y: Array) -> Array:
    q, _ = tl.qr(y)
    return q


def _seed(seed: int, stream: int) -> int:
    """One seed per draw: ``stream`` is the layer (or L, for the in-memory range finder)."""
    return seed * 1_000_003 + stream


def _block_sq(block: Array) -> float:
    """``||block||_F^2``, reduced in the compute dtype and returned as a float.

    ``sum(block * block)``: torch and numpy sum pairwise (relative error ~1e-8 in float32
    at 2 MiB), where torch's float32 ``norm`` accumulates naively (-3e-5 at 2 MiB, -0.4% on
    a whole 4096 x 4096 layer).
    """
    return to_float(tl.sum(block * block))


def _range_of(x: Array, k: int, seed: int, n_power: int = 2) -> Array:
    """An orthonormal basis (d, k) of the dominant left subspace of ``x`` (d, n), held in memory.

    A Gaussian sketch with ``n_power`` power iterations: ``x`` here is already noise-filtered
    (the layers times a subspace basis), so its spectrum decays fast and this is near exact.
    """
    q = _orthonormal(tl.dot(x, gaussian([(int(x.shape[1]), k)], seed, x)[0]))
    for _ in range(n_power):
        q = _orthonormal(tl.dot(x, tl.dot(tl.transpose(x), q)))
    return q


def _exact(
    stack: LayerStack,
    shape: tuple[int, int],
    rank: tuple[int, int] | None,
    energy: float | None,
    n_iter: int,
    progress: Progress,
    name: str,
) -> tuple[Tucker2, float]:
    n_layers, (d_out, d_in) = len(stack), shape
    bound_out, bound_in = min(d_out, n_layers * d_in), min(d_in, n_layers * d_out)
    f64 = float64_of(stack.dtype)
    norm_sq = 0.0
    gram_out = tl.zeros((d_out, d_out), dtype=f64)
    gram_in = tl.zeros((d_in, d_in), dtype=f64)
    for i, delta in stack.layers(progress, f"{name}: Gram matrices"):
        d64 = as_float(delta, f64)
        norm_sq += stack.check_finite(i, _norm_sq(d64))
        gram_out += tl.dot(d64, tl.transpose(d64))
        gram_in += tl.dot(tl.transpose(d64), d64)
    s_out, vectors_out = _eigen(gram_out)
    s_in, vectors_in = _eigen(gram_in)
    r_out = choose_rank(tl.sqrt(s_out[:bound_out]), bound_out, None if rank is None else rank[0], energy)
    r_in = choose_rank(tl.sqrt(s_in[:bound_in]), bound_in, None if rank is None else rank[1], energy)
    u, v = as_float(vectors_out[:, :r_out], stack.dtype), as_float(vectors_in[:, :r_in], stack.dtype)
    del gram_out, gram_in, vectors_out, vectors_in
    for sweep in range(n_iter):  # HOOI, two passes per sweep
        gram = tl.zeros((d_out, d_out), dtype=f64)
        for _, delta in stack.layers(progress, f"{name}: HOOI {sweep + 1} (U)"):
            z = as_float(tl.dot(delta, v), f64)
            gram += tl.dot(z, tl.transpose(z))
        u = as_float(_eigen(gram)[1][:, :r_out], stack.dtype)
        gram = tl.zeros((d_in, d_in), dtype=f64)
        for _, delta in stack.layers(progress, f"{name}: HOOI {sweep + 1} (V)"):
            z = as_float(tl.dot(tl.transpose(u), delta), f64)
            gram += tl.dot(tl.transpose(z), z)
        v = as_float(_eigen(gram)[1][:, :r_in], stack.dtype)
    core = tl.zeros((n_layers, r_out, r_in), dtype=stack.dtype)
    for i, delta in stack.layers(progress, f"{name}: cores"):
        core[i] = tl.dot(tl.dot(tl.transpose(u), delta), v)
    return Tucker2(core, u, v), norm_sq


def _randomized(
    stack: LayerStack,
    shape: tuple[int, int],
    rank: tuple[int, int] | None,
    energy: float | None,
    n_iter: int,
    *,
    oversample: int,
    n_power: int,
    max_rank: int,
    seed: int,
    progress: Progress,
    name: str,
) -> tuple[Tucker2, float, tuple[int, int]]:
    n_layers, (d_out, d_in) = len(stack), shape
    dtype = stack.dtype
    bound_out, bound_in = min(d_out, n_layers * d_in), min(d_in, n_layers * d_out)
    cap_out = rank[0] if rank is not None else (max_rank if energy is not None else bound_out)
    cap_in = rank[1] if rank is not None else (max_rank if energy is not None else bound_in)
    k_out, k_in = min(bound_out, cap_out + oversample), min(bound_in, cap_in + oversample)
    norm_sq = 0.0
    # the sketches of mode 2 are kept transposed, Y_in^T (k_in, d_in): each block adds a
    # product (k_in, rows) @ (rows, d_in) in place, a row-major GEMM
    y_in_t = tl.zeros((k_in, d_in), dtype=dtype)
    y_out = tl.zeros((d_out, k_out), dtype=dtype) if n_power == 0 else None
    for i, layer in stack.layer_blocks(progress, f"{name}: sketch"):
        # Gaussian test matrices drawn per layer (never held for the whole stack), seeded per layer
        if y_out is None:
            (psi,) = gaussian([(d_out, k_in)], _seed(seed, i), y_in_t)
        else:
            omega, psi = gaussian([(d_in, k_out), (d_out, k_in)], _seed(seed, i), y_in_t)
        psi_t = tl.transpose(psi)
        layer_sq = 0.0
        for start, block in layer():
            stop = start + int(block.shape[0])
            layer_sq += _block_sq(block)
            add_product(y_in_t, psi_t[:, start:stop], block)
            if y_out is not None:
                add_product(y_out[start:stop], block, omega)
        norm_sq += stack.check_finite(i, layer_sq)
    q_in = _orthonormal(tl.transpose(y_in_t))
    if y_out is not None:
        q_out = _orthonormal(y_out)
    else:  # each power pass keeps X_l = dW_l Q_in side by side: (d_out, L * k_in)
        x = tl.zeros((d_out, n_layers * k_in), dtype=dtype)
    for it in range(n_power):
        y_in_t = tl.zeros((k_in, d_in), dtype=dtype)
        for i, layer in stack.layer_blocks(progress, f"{name}: power iteration {it + 1}"):
            cols = slice(i * k_in, (i + 1) * k_in)
            for start, block in layer():
                stop = start + int(block.shape[0])
                x_rows = tl.dot(block, q_in)  # (rows, k_in)
                x[start:stop, cols] = x_rows
                add_product(y_in_t, tl.transpose(x_rows), block)
        q_in = _orthonormal(tl.transpose(y_in_t))
    if n_power:
        # HOOI's update of U from the last pass's V (Q_in): the dominant left subspace of
        # [dW_1 Q_in, ..., dW_L Q_in], whose noise the projection has cut to k_in / d_in
        q_out = _range_of(x, k_out, _seed(seed, n_layers))
        del x
    projected = tl.zeros((n_layers, int(q_out.shape[1]), int(q_in.shape[1])), dtype=dtype)
    z = tl.zeros((d_out, int(q_in.shape[1])), dtype=dtype)
    for i, layer in stack.layer_blocks(progress, f"{name}: project"):
        for start, block in layer():
            z[start : start + int(block.shape[0])] = tl.dot(block, q_in)
        projected[i] = tl.dot(tl.transpose(q_out), z)
    sketch_sq = to_float(tl.sum(as_float(projected, float64_of(projected)) ** 2))
    # energy is asked of the true total; the sketch holds sketch_sq of norm_sq
    inner_energy = None if energy is None else min(1.0, energy * norm_sq / sketch_sq) if sketch_sq > 0 else 1.0
    inner_rank = None if rank is None else (min(rank[0], k_out), min(rank[1], k_in))
    small = tucker2(projected, inner_rank, energy=inner_energy, n_iter=n_iter)
    tucker = Tucker2(small.core, tl.dot(q_out, small.out_factor), tl.dot(q_in, small.in_factor))
    return tucker, norm_sq, (k_out, k_in)


def tucker2_streaming(
    stack: LayerStack,
    shape: tuple[int, int],
    rank: tuple[int, int] | None = None,
    *,
    energy: float | None = None,
    n_iter: int = 0,
    gram_max_dim: int = 1024,
    oversample: int = 16,
    n_power: int = 1,
    max_rank: int = 256,
    seed: int = 0,
    progress: Progress | None = None,
    name: str = "",
) -> tuple[Tucker2, float, str]:
    """Tucker-2 of a stack read one layer at a time, never held whole (module docstring).

    Parameters
    ----------
    stack : LayerStack
        L matrices of shape ``shape``, read in passes.
    shape : (d_out, d_in)
        The shape of each layer.
    rank : (r_out, r_in), optional
        Tucker ranks; ``None`` without ``energy`` keeps the full rank (exact on the Gram route).
    energy : float in (0, 1], optional
        As in :func:`tensorlotr.tucker2`, of the whole stack's energy; ``rank`` caps it.
    n_iter : int
        HOOI sweeps: two extra passes each on the Gram route, in memory on the sketch.
    gram_max_dim : int
        The Gram route is taken when ``max(d_out, d_in) <= gram_max_dim``.
    oversample : int
        Sketch columns beyond the rank on the randomized route.
    n_power : int
        Power iterations on the randomized route, one pass each.
    max_rank : int
        Caps the sketch when only ``energy`` is given, on the randomized route.
    seed : int
        Seeds the Gaussian test matrices (per layer).
    progress : callable, optional
        ``progress(items, description, total)``, passed on to the stack's passes.
    name : str
        Prefix of the pass descriptions.

    Returns
    -------
    tucker : Tucker2
        ``core`` (L, r_out, r_in), orthonormal ``out_factor`` (d_out, r_out) and
        ``in_factor`` (d_in, r_in), in ``stack.dtype``.
    norm_sq : float
        ``||dW||_F^2`` of the whole stack, summed in float64 (on the randomized route each
        block's share is reduced in the compute dtype first).
    route : str
        ``"exact (Gram)"`` or ``"randomized (k=..., ... power)"``.
    """
    progress = progress or _no_progress
    with backend_for(stack.dtype):
        if max(shape) <= gram_max_dim:
            tucker, norm_sq = _exact(stack, shape, rank, energy, n_iter, progress, name)
            return tucker, norm_sq, "exact (Gram)"
        tucker, norm_sq, (k_out, k_in) = _randomized(
            stack, shape, rank, energy, n_iter, oversample=oversample, n_power=n_power, max_rank=max_rank,
            seed=seed, progress=progress, name=name,
        )  # fmt: skip
        return tucker, norm_sq, f"randomized (k={k_out}x{k_in}, {n_power} power)"
