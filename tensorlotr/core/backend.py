"""Backend selection and input validation for the math core.

The core works on numpy arrays and torch tensors alike. It picks the tensorly backend
that matches its inputs and never imports torch itself, so it knows nothing of modules.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import lru_cache
from typing import Any, TypeAlias

import numpy as np
import tensorly as tl

#: A numpy array or a torch tensor. The core never imports torch and tensorly's functions are
#: untyped, so the alias stays ``Any``: a union would be checked against nothing they return.
Array: TypeAlias = Any


def is_torch(x: object) -> bool:
    """True for a torch tensor, found without importing torch."""
    return type(x).__module__.startswith("torch")


def backend_name(*arrays: object) -> str:
    """The tensorly backend for ``arrays``: ``"pytorch"`` if any is a torch tensor."""
    return "pytorch" if any(is_torch(a) for a in arrays) else "numpy"


@contextmanager
def backend_for(*arrays: object) -> Iterator[str]:
    """Run the body under the tensorly backend that matches ``arrays``.

    The backend is set for this thread only and restored afterwards.
    """
    name = backend_name(*arrays)
    if tl.get_backend() == name:
        yield name
        return
    with tl.backend_context(name, local_threadsafe=True):
        yield name


@contextmanager
def small_lapack_calls(*arrays: object) -> Iterator[None]:
    """One BLAS/LAPACK thread inside the body, which makes many small QRs and SVDs.

    Threads are started (or woken) for every call, and for d x r factors that costs more
    than the call: a 768 x 96 QR takes 15 ms on numpy's 2 OpenBLAS threads and 2.5 ms on one;
    torch's ``ormqr`` at 768 x 96 took 8 ms on 2 threads of a busy machine and 0.07 ms on one.
    numpy's BLAS libraries are found once per process (threadpoolctl's scan of the loaded
    libraries costs about 1 ms); for torch the intra-op thread count is set to 1 and restored
    (process-wide, for the duration of the body). A list stands for its first array.
    """
    arrays = tuple(a[0] if isinstance(a, (list, tuple)) and a else a for a in arrays)
    if backend_name(*arrays) == "numpy":
        with _thread_pools().limit(limits=1, user_api="blas"):
            yield
        return
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@lru_cache(maxsize=1)
def _thread_pools() -> Any:
    """threadpoolctl's controller of the BLAS libraries loaded at the first call."""
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


def compute_dtype(x: Array) -> Any:
    """The floating dtype to compute in: float32 or float64; half precision is upcast."""
    if is_torch(x):
        import torch  # only reached when the caller already uses torch

        if x.dtype == torch.float64:
            return torch.float64
        if x.dtype.is_floating_point:
            return torch.float32
        raise ValueError(f"expected a floating-point tensor, got dtype {x.dtype}")
    dtype = np.asarray(x).dtype
    if dtype == np.float64:
        return np.float64
    if dtype.kind == "f":
        return np.float32
    raise ValueError(f"expected a floating-point array, got dtype {dtype}")


def float64_of(x: Any) -> Any:
    """The float64 dtype of the backend of ``x``, an array or a dtype."""
    if is_torch(x):
        import torch

        return torch.float64
    return np.float64


def add_product(out: Array, a: Array, b: Array) -> None:
    """``out += a @ b`` in place: on torch one GEMM that accumulates (``addmm_``), no temporary."""
    if is_torch(out):
        out.addmm_(a, b)
    else:
        out += a @ b


class Buffers:
    """Flat buffers reused from one batch to the next, by name: no allocation (nor page fault) per batch.

    On torch, :meth:`stack` stacks into a reused buffer of the arrays' dtype and casts into one of
    the target dtype, and :meth:`sum_products` reuses a buffer for its transposed copy; on numpy
    both allocate, as plain expressions do. A view returned for a name is overwritten by the
    next call for that name.

    Examples
    --------
    >>> import torch
    >>> buffers = Buffers()
    >>> layers = [torch.ones(3, 2, dtype=torch.bfloat16) * i for i in range(4)]
    >>> stacked = buffers.stack("B", layers, torch.float32)
    >>> stacked.shape, stacked.dtype, float(stacked[3, 0, 0])
    (torch.Size([4, 3, 2]), torch.float32, 3.0)
    >>> x = torch.ones(4, 2, 5)
    >>> y = torch.zeros(3, 5)
    >>> buffers.sum_products(y, stacked, x)  # y += sum_l B_l x_l
    >>> float(y[0, 0])
    12.0
    """

    def __init__(self) -> None:
        self._flat: dict[tuple[str, Any], Any] = {}

    def _view(self, name: str, shape: tuple[int, ...], like: Any, dtype: Any) -> Any:
        import torch

        size = math.prod(shape)
        flat = self._flat.get((name, dtype))
        if flat is None or flat.numel() < size:
            flat = torch.empty(size, dtype=dtype, device=like.device)
            self._flat[(name, dtype)] = flat
        return flat[:size].view(shape)

    def stack(self, name: str, arrays: Sequence[Array], dtype: Any) -> Array:
        """``arrays`` (n arrays of one shape) stacked, (n, ...), in ``dtype``."""
        if not is_torch(arrays[0]):
            return as_float(tl.stack(list(arrays)), dtype)
        import torch

        shape = (len(arrays), *arrays[0].shape)
        stage = self._view(name, shape, arrays[0], arrays[0].dtype)
        torch.stack(list(arrays), out=stage)
        if stage.dtype == dtype:
            return stage
        out = self._view(name, shape, arrays[0], dtype)
        out.copy_(stage)
        return out

    def sum_products(self, out: Array, b: Array, x: Array) -> None:
        """``out += sum_l b_l x_l`` in place, ``b`` (n, d, r) and ``x`` (n, r, k): one GEMM, (d, n r) by (n r, k)."""
        n, d, r = (int(s) for s in b.shape)
        if not is_torch(out):
            out += tl.einsum("ndr,nrk->dk", b, x)
            return
        wide = self._view("sum_products", (d, n, r), b, b.dtype)
        wide.copy_(b.permute(1, 0, 2))
        out.addmm_(wide.view(d, n * r), x.reshape(n * r, -1))

    def clear(self) -> None:
        """Free the buffers."""
        self._flat.clear()


def gaussian(shapes: list[tuple[int, ...]], seed: int, like: Array) -> list[Array]:
    """Standard normal arrays of ``shapes``, drawn in turn from one generator seeded by ``seed``.

    They have the dtype and device of ``like``; torch draws with torch's generator (about 20x
    faster than numpy's for float32).
    """
    if is_torch(like):
        import torch

        generator = torch.Generator(device=like.device).manual_seed(seed)
        return [torch.randn(shape, generator=generator, dtype=like.dtype, device=like.device) for shape in shapes]
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape).astype(like.dtype, copy=False) for shape in shapes]


def as_float(x: Array, dtype: Any) -> Array:
    """``x`` as an array of ``dtype`` on the backend it came from."""
    if is_torch(x):
        return x.to(dtype)
    return np.asarray(x, dtype=dtype)


def all_finite(x: Array) -> bool:
    """True if ``x`` holds no NaN or Inf."""
    if is_torch(x):
        import torch

        return bool(torch.isfinite(x).all())
    return bool(np.isfinite(x).all())


def check_finite(x: Array, what: str) -> None:
    """Raise ``ValueError`` naming ``what`` if ``x`` holds NaN or Inf."""
    if not all_finite(x):
        raise ValueError(f"{what} contains NaN or Inf values")


def check_ndim(x: Array, ndim: int, what: str, shape_doc: str) -> None:
    """Raise ``ValueError`` if ``x`` does not have ``ndim`` dimensions."""
    if len(x.shape) != ndim:
        raise ValueError(f"{what} must have {ndim} dimensions {shape_doc}, got shape {tuple(x.shape)}")


def to_float(x: Array) -> float:
    """A 0-d array as a Python float."""
    return float(x.item()) if hasattr(x, "item") else float(x)


def normalize_rank(rank: int | Sequence[int] | None) -> tuple[int, int] | None:
    """``rank`` as ``(r_out, r_in)``; an int means equal ranks. Ranks must be positive.

    >>> normalize_rank(8), normalize_rank((16, 4)), normalize_rank(None)
    ((8, 8), (16, 4), None)
    """
    if rank is None:
        return None
    if isinstance(rank, (int, np.integer)) and not isinstance(rank, bool):
        pair = (int(rank), int(rank))
    else:
        try:
            r_out, r_in = rank  # type: ignore[misc]
            pair = (int(r_out), int(r_in))
        except (TypeError, ValueError):
            raise ValueError(f"rank must be an int or a pair (r_out, r_in), got {rank!r}") from None
    if min(pair) <= 0:
        raise ValueError(f"rank must be positive, got {rank!r}")
    return pair


def max_rank(n_layers: int, shape: tuple[int, int]) -> tuple[int, int]:
    """The largest Tucker-2 ranks a stack of ``n_layers`` matrices of ``shape`` (d_out, d_in) has.

    ``(min(d_out, L*d_in), min(d_in, L*d_out))``: the ranks of the mode-1 and mode-2 unfoldings.

    Examples
    --------
    >>> max_rank(2, (32, 8))
    (16, 8)
    """
    (d_out, d_in) = shape
    return min(d_out, n_layers * d_in), min(d_in, n_layers * d_out)


def check_rank(group: str, n_layers: int, shape: tuple[int, int], rank: tuple[int, int]) -> None:
    """Refuse (``ValueError``) a rank above :func:`max_rank` for a group of ``n_layers`` of ``shape``.

    Examples
    --------
    >>> check_rank("q_proj", 2, (32, 8), (16, 8))
    >>> check_rank("q_proj", 2, (32, 8), (17, 8))
    Traceback (most recent call last):
    ...
    ValueError: group 'q_proj' (2 layers of 32x8, d_out x d_in) cannot take rank (17, 8): ...
    """
    (d_out, d_in), (r_out, r_in) = shape, rank
    max_out, max_in = max_rank(n_layers, shape)
    if r_out > max_out or r_in > max_in:
        raise ValueError(
            f"group {group!r} ({n_layers} layers of {d_out}x{d_in}, d_out x d_in) cannot take rank ({r_out}, {r_in}): "
            f"the largest sensible rank is ({max_out}, {max_in}) = (min(d_out, L*d_in), min(d_in, L*d_out)); "
            f"lower rank, or set rank_pattern[{group!r}]"
        )


def clipped_rank_note(group: str, requested: tuple[int, int] | None, kept: Sequence[int]) -> str | None:
    """The report's note for a group kept below the rank asked for (its exact rank is lower), else None.

    Examples
    --------
    >>> clipped_rank_note("q_proj", (64, 64), (16, 8))
    'group q_proj: rank 64x64 is above its exact rank; kept 16x8'
    >>> clipped_rank_note("q_proj", (8, 8), (8, 8)) is None
    True
    """
    if requested is None or (kept[0] >= requested[0] and kept[1] >= requested[1]):
        return None
    return f"group {group}: rank {requested[0]}x{requested[1]} is above its exact rank; kept {kept[0]}x{kept[1]}"


def check_energy(energy: float | None) -> None:
    """Raise ``ValueError`` unless ``energy`` is None or in (0, 1].

    >>> check_energy(0.99)
    >>> check_energy(1.5)
    Traceback (most recent call last):
    ...
    ValueError: energy must be in (0, 1], got 1.5
    """
    if energy is not None and not 0.0 < float(energy) <= 1.0:
        raise ValueError(f"energy must be in (0, 1], got {energy!r}")
