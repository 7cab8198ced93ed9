"""Adapter layers: the shared factors of a group, and the wrapped Linear / Conv1D.

The adapter's forward ``((x V) G^T) U^T`` is one einsum, ``ADAPTER_FORWARD``. opt_einsum
chooses its contraction order when a layer is built (:func:`plan_batched`, once per power of
two of the row count N); the forward only selects the order for its N and runs it as plain
matrix products (:func:`execute`). So ``torch.compile`` traces the forward as torch ops, and
``torch.autocast`` casts each product as it casts a ``Linear``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import opt_einsum
import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .targets import dense_weight, quantization, set_dense_weight, weight_shape

#: U (d_out, r_out), G (r_out, r_in), V (d_in, r_in), x (N, d_in) -> (N, d_out). This operand
#: order makes opt_einsum's plan compute x V (N, r_in) and (U G)^T (r_in, d_out) as row-major
#: GEMMs with no transposed intermediates: 1.3-1.5x faster forward+backward than other orders.
ADAPTER_FORWARD = "mo,oi,ni,bn->bm"
#: The operands of ``ADAPTER_FORWARD`` that ``x V`` is computed from: V and x.
INPUT_PRODUCT = frozenset({2, 3})
#: :func:`plan_batched` plans at row counts 1, 2, 4, ..., 2**BATCH_LOG2_MAX.
BATCH_LOG2_MAX = 24

Shapes = tuple[tuple[int, ...], ...]


# --- contraction plans ----------------------------------------------------------------


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
    gemm : (bool, bool, bool) or None
        ``(swap, transpose_first, transpose_second)`` when the step is one product of two
        matrices: ``first @ second``, where ``first`` is the first popped operand (the second if
        ``swap``), each transposed as flagged. ``None``: the step runs with ``torch.einsum``.
    """

    positions: tuple[int, ...]
    equation: str
    inputs: tuple[frozenset[int], ...]
    sources: frozenset[int]
    gemm: tuple[bool, bool, bool] | None

    def apply(self, *operands: torch.Tensor) -> torch.Tensor:
        """Contract the popped ``operands``, given in popping order."""
        if self.gemm is None:
            return torch.einsum(self.equation, *operands)
        swap, transpose_first, transpose_second = self.gemm
        first, second = (operands[1], operands[0]) if swap else (operands[0], operands[1])
        return (first.T if transpose_first else first) @ (second.T if transpose_second else second)


Path = tuple[Step, ...]


def _gemm(equation: str) -> tuple[bool, bool, bool] | None:
    """How the pairwise ``equation`` runs as one matrix product, or None if it is not one."""
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
    if out == free_first + free_second:  # (f1, k) @ (k, f2)
        return False, first != free_first + k, second != k + free_second
    if out == free_second + free_first:  # (f2, k) @ (k, f1)
        return True, second != free_second + k, first != k + free_first
    return None


@lru_cache(maxsize=256)
def plan_path(subscripts: str, shapes: Shapes) -> Path:
    """opt_einsum's contraction order for ``subscripts`` on operands of ``shapes``, as steps."""
    _, info = opt_einsum.contract_path(subscripts, *shapes, shapes=True, optimize="auto")
    sources = [frozenset({i}) for i in range(len(shapes))]
    steps = []
    for positions, _, equation, *_ in info.contraction_list:
        inputs = tuple(sources.pop(p) for p in positions)
        merged = frozenset().union(*inputs)
        sources.append(merged)
        steps.append(Step(tuple(positions), equation, inputs, merged, _gemm(equation)))
    return tuple(steps)


def find_step(path: Path, sources: frozenset[int]) -> Step | None:
    """The step of ``path`` whose result is computed from exactly the original ``sources``, if any."""
    for step in path:
        if step.sources == sources:
            return step
    return None


def execute(
    path: Path, operands: list[torch.Tensor], known: Mapping[frozenset[int], torch.Tensor] | None = None
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
    """
    work = list(operands)
    for step in path:
        popped = [work.pop(p) for p in step.positions]
        if known is not None and step.sources in known:
            work.append(known[step.sources])
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
        An einsum expression, e.g. ``ADAPTER_FORWARD``.
    shapes : tuple of tuple of int
        The operands' shapes; the entry of the varying axis is ignored.
    batch : (int, int)
        (operand, axis) of the varying size.

    Returns
    -------
    BatchedPlan
        The distinct paths for N = 1, 2, 4, ..., 2**BATCH_LOG2_MAX, each with the largest N it serves.
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


# --- x V shared by the layers of a group that read the same input ----------------------


class _SharedInputProduct:
    """``x V`` of one group, kept while a parent module of two or more of the group's layers runs.

    The parent's forward pre-hook opens the scope and its forward hook (``always_call``) clears
    it, so nothing outlives the parent's forward. Within it, a layer reuses the product when it
    reads the same tensor object, unmodified (version counters), in the same grad and autocast
    mode, as the layer that computed it. The reuse is the same tensor in the same autograd
    graph: gradients from both layers accumulate into it.
    """

    def __init__(self) -> None:
        self.depth = 0
        self.entry: tuple[torch.Tensor, tuple[Any, ...], torch.Tensor] | None = None

    @property
    def open(self) -> bool:
        return self.depth > 0

    def get(self, x: torch.Tensor, key: tuple[Any, ...], compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The product for input ``x`` under ``key``, computed by ``compute`` unless held."""
        entry = self.entry
        if entry is not None and entry[0] is x and entry[1] == key:
            return entry[2]
        value = compute()
        self.entry = (x, key, value)
        return value

    def enter(self) -> None:
        self.depth += 1

    def exit(self) -> None:
        self.depth = max(0, self.depth - 1)
        if self.depth == 0:
            self.entry = None


class _ShareScope:
    """Forward hooks of a parent module that opens and clears the shared products of ``factors``."""

    def __init__(self, factors: list[LoTRFactors]) -> None:
        self.factors = factors

    def enter(self, module: nn.Module, args: Any) -> None:
        if torch.compiler.is_compiling():
            return  # compiled graphs compute each product; the compiler merges common subexpressions
        for factors in self.factors:
            factors.shared_input.enter()

    def exit(self, module: nn.Module, args: Any, output: Any) -> None:
        if torch.compiler.is_compiling():
            return
        for factors in self.factors:
            factors.shared_input.exit()


def share_input_products(model: nn.Module) -> list[RemovableHandle]:
    """Let the layers of a group that sit in one parent module compute ``x V`` once per forward.

    For each module with two or more :class:`LoTRLayer` children of the same group (query and
    value of one attention block with ``groups="shared"``), hooks open a scope for the group's
    factors while that module runs. Returns the hook handles; remove them to stop sharing.
    """
    by_parent: dict[str, dict[int, list[LoTRLayer]]] = {}
    for name, module in model.named_modules():
        if isinstance(module, LoTRLayer):
            parent = name.rpartition(".")[0]
            by_parent.setdefault(parent, {}).setdefault(id(module.factors), []).append(module)
    handles = []
    for parent, groups in by_parent.items():
        shared = [layers[0].factors for layers in groups.values() if len(layers) > 1]
        if shared:
            scope = _ShareScope(shared)
            module = model.get_submodule(parent)
            handles.append(module.register_forward_pre_hook(scope.enter))
            handles.append(module.register_forward_hook(scope.exit, always_call=True))
    return handles


# --- modules ------------------------------------------------------------------------------


class LoTRFactors(nn.Module):
    """The factors shared by every layer of a group: ``U`` (d_out, r_out) and ``V`` (d_in, r_in)."""

    def __init__(self, d_out: int, d_in: int, rank: tuple[int, int], dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        r_out, r_in = rank
        self.out_factor = nn.Parameter(torch.empty(d_out, r_out, dtype=dtype))
        self.in_factor = nn.Parameter(torch.empty(d_in, r_in, dtype=dtype))
        self.shared_input = _SharedInputProduct()
        self.reset_orthonormal()

    @property
    def rank(self) -> tuple[int, int]:
        return int(self.out_factor.shape[1]), int(self.in_factor.shape[1])

    @torch.no_grad()
    def reset_orthonormal(self) -> None:
        """Random factors with orthonormal columns (columns beyond d are zero)."""
        for factor in (self.out_factor, self.in_factor):
            d, r = factor.shape
            q, _ = torch.linalg.qr(torch.randn(d, min(d, r), dtype=torch.float64))
            factor.zero_()
            factor[:, : q.shape[1]] = q.to(factor.dtype)

    @torch.no_grad()
    def reset_normal(self) -> None:
        """Gaussian factors with standard deviation ``1/sqrt(d)``, as the original code."""
        for factor in (self.out_factor, self.in_factor):
            factor.normal_(0.0, 1.0 / math.sqrt(factor.shape[0]))

    def extra_repr(self) -> str:
        return f"d_out={self.out_factor.shape[0]}, d_in={self.in_factor.shape[0]}, rank={self.rank}"


class LoTRLayer(nn.Module):
    """``y = base(x) + scale * ((x V) G^T) U^T`` around an ``nn.Linear``, GPT-2 ``Conv1D`` or bitsandbytes layer.

    The layer owns its core ``G`` (r_out, r_in). The factors belong to the group's
    :class:`LoTRFactors`, registered once at model level; the layer holds a reference
    that is not a submodule, so they are never copied or saved per layer.

    Dtypes: the input is cast to the adapter's dtype (the factors'), except under
    ``torch.autocast``, which casts every product to its own dtype; the update is cast to the
    dtype of the base layer's output before it is added.
    """

    def __init__(self, base_layer: nn.Module, factors: LoTRFactors, scale: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.d_out, self.d_in = weight_shape(base_layer)
        self.fan_in_fan_out = not isinstance(base_layer, nn.Linear)  # Conv1D stores (d_in, d_out)
        self._factors = (factors,)  # a tuple is not registered as a submodule
        self.lotr_core = nn.Parameter(torch.zeros(factors.rank, dtype=factors.out_factor.dtype))
        self.scale = float(scale)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.active = True
        r_out, r_in = factors.rank
        shapes = ((self.d_out, r_out), (r_out, r_in), (self.d_in, r_in), (1, self.d_in))
        self._plan = plan_batched(ADAPTER_FORWARD, shapes, (3, 0))

    @property
    def factors(self) -> LoTRFactors:
        return self._factors[0]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.merged or not self.active:
            return result
        return result + self.adapter_output(x).to(result.dtype)

    def adapter_output(self, x: torch.Tensor) -> torch.Tensor:
        """``scale * ((x V) G^T) U^T`` for ``x`` (..., d_in): (..., d_out), in the adapter's or autocast's dtype."""
        factors = self.factors
        inputs = self.dropout(x)
        if not torch.is_autocast_enabled(inputs.device.type):
            inputs = inputs.to(factors.in_factor.dtype)
        rows = inputs.reshape(-1, self.d_in)
        # the scale goes on the r_out x r_in core, not on the (N, d_out) output
        operands = [factors.out_factor, self.scale * self.lotr_core, factors.in_factor, rows]
        path = self._plan.path(rows.shape[0])
        known = None
        shared = factors.shared_input
        if shared.open and not torch.compiler.is_compiling() and not self._dropout_active():
            step = find_step(path, INPUT_PRODUCT)
            if step is not None:
                key = self._sharing_key(x, inputs.device.type)
                popped = [operands[min(s)] for s in step.inputs]  # V and x themselves
                known = {INPUT_PRODUCT: shared.get(x, key, lambda: step.apply(*popped))}
        delta = execute(path, operands, known)
        return delta.reshape(*x.shape[:-1], self.d_out)

    def _dropout_active(self) -> bool:
        return isinstance(self.dropout, nn.Dropout) and self.dropout.training and self.dropout.p > 0

    def _sharing_key(self, x: torch.Tensor, device_type: str) -> tuple[Any, ...]:
        """What must match for two layers to share ``x V``: the input's and V's versions, grad and autocast modes."""
        version = None if x.is_inference() else x._version  # inference tensors keep no version counter
        autocast = torch.is_autocast_enabled(device_type)
        return (
            version,
            self.factors.in_factor._version,
            torch.is_grad_enabled(),
            autocast,
            torch.get_autocast_dtype(device_type) if autocast else None,
        )

    def delta_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``scale * U G V^T``, shape (d_out, d_in), in ``dtype`` (default: the adapter's dtype)."""
        factors = self.factors
        u, g, v = factors.out_factor, self.lotr_core, factors.in_factor
        if dtype is not None:
            u, g, v = u.to(dtype), g.to(dtype), v.to(dtype)
        return self.scale * (u @ g @ v.T)

    @torch.no_grad()
    def _add_to_base(self, sign: float) -> None:
        """Add ``sign * delta_weight()`` to the base weight, computed in float32 or wider.

        A bitsandbytes base is dequantized, updated and quantized again, as PEFT merges LoRA
        into it; the result carries the rounding of a second quantization.
        """
        base = self.base_layer
        if quantization(base) is not None:
            warnings.warn(
                f"merging into the {quantization(base)} weight of a {type(base).__name__} quantizes the sum again: "
                "outputs differ from the unmerged adapter by that rounding, and unmerging does not restore the "
                "original quantized weight exactly",
                stacklevel=3,
            )
        weight = dense_weight(base)
        work = torch.promote_types(torch.promote_types(weight.dtype, self.lotr_core.dtype), torch.float32)
        set_dense_weight(base, weight.to(work) + sign * self.delta_weight(work))

    def merge(self) -> None:
        """Add the update into the base weight; the forward then skips the adapter."""
        if not self.merged:
            self._add_to_base(1.0)
            self.merged = True

    def unmerge(self) -> None:
        """Subtract the update from the base weight again."""
        if self.merged:
            self._add_to_base(-1.0)
            self.merged = False

    def extra_repr(self) -> str:
        return f"rank={self.factors.rank}, scale={self.scale:g}, merged={self.merged}"
