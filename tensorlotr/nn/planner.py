"""Einsum contraction plans run as plain matrix products: opt_einsum chooses the order once, torch runs it.

The planner knows nothing of LoTR. :func:`plan_path` turns opt_einsum's contraction order for
an expression and its operand shapes into :class:`Step` s, each a pairwise contraction that runs
as one GEMM where it can (:func:`_gemm`); :func:`execute` runs a path on tensors, taking
intermediates computed elsewhere; :func:`plan_batched` plans once per power of two of a varying
row count, so a forward only selects its path (:meth:`BatchedPlan.path`). ``torch.compile``
traces the products as torch ops, and ``torch.autocast`` casts each as it casts a ``Linear``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache

import opt_einsum
import torch

__all__ = ["BatchedPlan", "Path", "Shapes", "Step", "execute", "find_step", "plan_batched", "plan_path"]

#: :func:`plan_batched` plans at row counts 1, 2, 4, ..., 2**BATCH_LOG2_MAX.
BATCH_LOG2_MAX = 24
#: A product with fewer output columns than this and at least ``TALL_ROWS`` rows runs transposed (:func:`_gemm`).
NARROW_COLUMNS = 16
TALL_ROWS = 64

Shapes = tuple[tuple[int, ...], ...]


@dataclass(frozen=True)
class Step:
    """One pairwise contraction of a path, in opt_einsum's convention.

    The operands at ``positions`` of the working list are popped in that order, contracted by
    ``equation`` (their subscripts in popping order), and the result is appended.

    Attributes
    ----------
    positions : tuple of int
        Positions in the working list, popped in this order.
    equation : str
        The einsum equation of the popped operands, e.g. ``"bn,ni->bi"``.
    inputs : tuple of frozenset of int
        For each popped operand, the original operands it is computed from.
    sources : frozenset of int
        The original operands the result is computed from (the union of ``inputs``).
    gemm : (bool, bool, bool, bool) or None
        ``(swap, transpose_first, transpose_second, transposed)`` when the step is one product of
        two matrices: ``first @ second``, where ``first`` is the first popped operand (the second
        if ``swap``), each transposed as flagged; with ``transposed`` it runs as
        ``(second^T @ first^T)^T`` (see :func:`_gemm`). ``None``: the step runs with ``torch.einsum``.

    Examples
    --------
    The first step of ``U`` (32, 4), ``G`` (4, 4), ``V`` (32, 4) and ``x`` (8, 32) computes ``x V``
    from operands 3 and 2, popped in that order, as one plain product:

    >>> import torch
    >>> step = plan_path("mo,oi,ni,bn->bm", ((32, 4), (4, 4), (32, 4), (8, 32)))[0]
    >>> step.positions, step.equation, sorted(step.sources)
    ((3, 2), 'bn,ni->bi', [2, 3])
    >>> x, v = torch.randn(8, 32), torch.randn(32, 4)
    >>> torch.allclose(step.apply(x, v), x @ v)
    True
    >>> torch.allclose(step.apply(x, v, add_to=torch.ones(8, 4), alpha=2.0), 1 + 2 * (x @ v))
    True
    """

    positions: tuple[int, ...]
    equation: str
    inputs: tuple[frozenset[int], ...]
    sources: frozenset[int]
    gemm: tuple[bool, bool, bool, bool] | None

    def apply(self, *operands: torch.Tensor, add_to: torch.Tensor | None = None, alpha: float = 1.0) -> torch.Tensor:
        """Contract the popped ``operands``, given in popping order.

        With ``add_to`` (shaped as the result) return ``add_to + alpha * result``; a matrix product
        then runs as one ``addmm``, with no separate scaling or addition pass over the output.
        """
        if self.gemm is None:
            product = torch.einsum(self.equation, *operands)
            return product if add_to is None else add_to + alpha * product
        swap, transpose_first, transpose_second, transposed = self.gemm
        first, second = (operands[1], operands[0]) if swap else (operands[0], operands[1])
        first, second = (first.T if transpose_first else first), (second.T if transpose_second else second)
        if transposed:
            if add_to is None:
                return (second.T @ first.T).T
            return torch.addmm(add_to.T, second.T, first.T, alpha=alpha).T
        return first @ second if add_to is None else torch.addmm(add_to, first, second, alpha=alpha)


Path = tuple[Step, ...]


def _gemm(equation: str, sizes: dict[str, int]) -> tuple[bool, bool, bool, bool] | None:
    """How the pairwise ``equation`` runs as one matrix product, or None if it is not one.

    ``sizes`` maps each index to its length. A tall, narrow result (fewer than ``NARROW_COLUMNS``
    columns, at least ``TALL_ROWS`` rows: ``x V`` at prefill) is computed transposed, as
    ``(second^T @ first^T)^T``: MKL's kernels for a GEMM with a handful of output columns run
    about 3x slower than the same product computed with the long dimension as columns
    (``x V`` on 2048 x 384 rows at rank 8: 0.63 ms against 0.20 ms, one thread).
    """
    inputs, out = equation.split("->")
    terms = inputs.split(",")
    if len(terms) != 2 or any(len(t) != 2 or len(set(t)) != 2 for t in (*terms, out)):
        return None
    first, second = terms
    shared = set(first) & set(second)
    if len(shared) != 1 or shared & set(out):
        return None
    (k,) = shared
    free_first, free_second = first.replace(k, ""), second.replace(k, "")
    transposed = sizes[out[1]] < NARROW_COLUMNS and sizes[out[0]] >= TALL_ROWS
    if out == free_first + free_second:  # (f1, k) @ (k, f2)
        return False, first != free_first + k, second != k + free_second, transposed
    if out == free_second + free_first:  # (f2, k) @ (k, f1)
        return True, second != free_second + k, first != k + free_first, transposed
    return None


@lru_cache(maxsize=256)
def plan_path(subscripts: str, shapes: Shapes) -> Path:
    """opt_einsum's contraction order for ``subscripts`` on operands of ``shapes``, as steps.

    Examples
    --------
    ``U`` (32, 4), ``G`` (4, 4), ``V`` (32, 4) and ``x`` (8, 32): every step is a matrix product.

    >>> path = plan_path("mo,oi,ni,bn->bm", ((32, 4), (4, 4), (32, 4), (8, 32)))
    >>> len(path), all(step.gemm is not None for step in path)
    (3, True)
    """
    _, info = opt_einsum.contract_path(subscripts, *shapes, shapes=True, optimize="auto")
    terms = subscripts.split("->")[0].split(",")
    sizes = {index: n for term, shape in zip(terms, shapes, strict=True) for index, n in zip(term, shape, strict=True)}
    sources = [frozenset({i}) for i in range(len(shapes))]
    steps = []
    for positions, _, equation, *_ in info.contraction_list:
        inputs = tuple(sources.pop(p) for p in positions)
        merged = frozenset().union(*inputs)
        sources.append(merged)
        steps.append(Step(tuple(positions), equation, inputs, merged, _gemm(equation, sizes)))
    return tuple(steps)


def find_step(path: Path, sources: frozenset[int]) -> Step | None:
    """The step of ``path`` whose result is computed from exactly the original ``sources``, if any.

    Examples
    --------
    The step that computes ``x V`` from operands 2 and 3 (``V`` and ``x``), at 8 rows:

    >>> path = plan_path("mo,oi,ni,bn->bm", ((32, 4), (4, 4), (32, 4), (8, 32)))
    >>> find_step(path, frozenset({2, 3})).equation
    'bn,ni->bi'
    >>> find_step(path, frozenset({0, 3})) is None
    True
    """
    for step in path:
        if step.sources == sources:
            return step
    return None


def execute(
    path: Path,
    operands: list[torch.Tensor],
    known: Mapping[frozenset[int], torch.Tensor] | None = None,
    add_to: torch.Tensor | None = None,
    alpha: float = 1.0,
) -> torch.Tensor:
    """Run ``path`` on ``operands``; a step whose sources are a key of ``known`` takes that value.

    Parameters
    ----------
    path : Path
        From :func:`plan_path`, or :meth:`BatchedPlan.path`, for the operands' shapes.
    operands : list of Tensor
        In the order of the subscripts.
    known : mapping of frozenset of int to Tensor, optional
        Intermediates computed elsewhere (``x V`` shared by two layers), keyed by the original
        operands they come from.
    add_to : Tensor, optional
        Shaped as the result: return ``add_to + alpha * result``, the last step adding as it multiplies.
    alpha : float
        The result's factor when ``add_to`` is given.

    Examples
    --------
    >>> import torch
    >>> u, g, v, x = torch.randn(32, 4), torch.randn(4, 4), torch.randn(32, 4), torch.randn(8, 32)
    >>> path = plan_path("mo,oi,ni,bn->bm", tuple(t.shape for t in (u, g, v, x)))
    >>> torch.allclose(execute(path, [u, g, v, x]), x @ v @ g.T @ u.T, atol=1e-5)
    True
    >>> known = {frozenset({2, 3}): x @ v}  # x V computed elsewhere
    >>> torch.allclose(execute(path, [u, g, v, x], known), x @ v @ g.T @ u.T, atol=1e-5)
    True
    """
    work = list(operands)
    last = path[-1]
    for step in path:
        popped = [work.pop(p) for p in step.positions]
        if known is not None and step.sources in known:
            work.append(known[step.sources])
        elif add_to is not None and step is last:
            work.append(step.apply(*popped, add_to=add_to, alpha=alpha))
        else:
            work.append(step.apply(*popped))
    (result,) = work
    return result


@dataclass(frozen=True)
class BatchedPlan:
    """opt_einsum's orders for an expression one of whose axes (N rows) varies.

    ``paths[i]`` serves ``N <= bounds[i]``; the last path serves every larger N. Each path is
    the one opt_einsum chose at the power of two at or above N, so choosing costs a few integer
    comparisons per call and never plans again.

    Examples
    --------
    >>> plan = plan_batched("mo,oi,ni,bn->bm", ((32, 4), (4, 4), (32, 4), (1, 32)), (3, 0))
    >>> plan.path(1) == plan_path("mo,oi,ni,bn->bm", ((32, 4), (4, 4), (32, 4), (1, 32)))
    True
    """

    subscripts: str
    bounds: tuple[int, ...]
    paths: tuple[Path, ...]

    def path(self, n: int) -> Path:
        """The path for ``n`` rows (a symbolic size under ``torch.compile``, which guards on the bounds)."""
        for bound, path in zip(self.bounds, self.paths, strict=False):
            if n <= bound:
                return path
        return self.paths[-1]


@lru_cache(maxsize=256)
def plan_batched(subscripts: str, shapes: Shapes, batch: tuple[int, int]) -> BatchedPlan:
    """Plan ``subscripts`` for every row count, where axis ``batch[1]`` of operand ``batch[0]`` varies.

    Parameters
    ----------
    subscripts : str
        An einsum expression, e.g. ``"mo,oi,ni,bn->bm"``.
    shapes : tuple of tuple of int
        The operands' shapes; the entry of the varying axis is ignored.
    batch : (int, int)
        (operand, axis) of the varying size.

    Returns
    -------
    BatchedPlan
        The distinct paths for N = 1, 2, 4, ..., 2**BATCH_LOG2_MAX, each with the largest N it serves.

    Examples
    --------
    The rows of ``x`` (axis 0 of operand 3) vary; a few distinct orders serve every N:

    >>> plan = plan_batched("mo,oi,ni,bn->bm", ((384, 8), (8, 8), (384, 8), (1, 384)), (3, 0))
    >>> 1 <= len(plan.paths) <= 4 and len(plan.bounds) == len(plan.paths) - 1
    True
    """
    operand, axis = batch
    bounds: list[int] = []
    paths: list[Path] = []
    for log2 in range(BATCH_LOG2_MAX + 1):
        n = 1 << log2
        sized = list(shapes)
        sized[operand] = (*shapes[operand][:axis], n, *shapes[operand][axis + 1 :])
        path = plan_path(subscripts, tuple(sized))
        if paths and paths[-1] == path:
            bounds[-1] = n
        else:
            paths.append(path)
            bounds.append(n)
    return BatchedPlan(subscripts, tuple(bounds[:-1]), tuple(paths))
