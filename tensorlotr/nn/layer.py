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
#: Sibling layers reuse ``x V`` from this many input rows up; below, the product (a few
#: thousand multiply-adds at one token) costs less than looking it up.
SHARE_MIN_ROWS = 32
#: :func:`plan_batched` plans at row counts 1, 2, 4, ..., 2**BATCH_LOG2_MAX.
BATCH_LOG2_MAX = 24
#: A product with fewer output columns than this and at least ``TALL_ROWS`` rows runs transposed (:func:`_gemm`).
NARROW_COLUMNS = 16
TALL_ROWS = 64

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
    gemm : (bool, bool, bool, bool) or None
        ``(swap, transpose_first, transpose_second, transposed)`` when the step is one product of
        two matrices: ``first @ second``, where ``first`` is the first popped operand (the second
        if ``swap``), each transposed as flagged; with ``transposed`` it runs as
        ``(second^T @ first^T)^T`` (see :func:`_gemm`). ``None``: the step runs with ``torch.einsum``.
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
    """opt_einsum's contraction order for ``subscripts`` on operands of ``shapes``, as steps."""
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
    """The step of ``path`` whose result is computed from exactly the original ``sources``, if any."""
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


#: The name PEFT gives a sample that runs without any adapter in a mixed batch.
BASE_ADAPTER = "__base__"


class LoTRLayer(nn.Module):
    """``y = base(x) + sum_a scale_a * ((x V_a) G_a^T) U_a^T`` around a Linear, GPT-2 Conv1D or bitsandbytes layer.

    The layer holds one core ``G_a`` (r_out, r_in) per named adapter ``a``, in ``lotr_cores``.
    The factors ``U_a``, ``V_a`` belong to the adapter group's :class:`LoTRFactors`, registered
    once at model level; the layer holds references that are not submodules, so factors are
    never copied or saved per layer, and several adapters may share them (a zoo). The active
    adapters' updates add up; with ``batch_adapters`` set (a mixed batch) sample ``i`` gets the
    update of adapter ``batch_adapters[i]`` only (``"__base__"``: none).

    Dtypes: the input is cast to the adapter's dtype (the factors'), except under
    ``torch.autocast``, which casts every product to its own dtype; the update is cast to the
    dtype of the base layer's output before it is added.
    """

    is_lotr_layer = True

    def __init__(
        self,
        base_layer: nn.Module,
        factors: LoTRFactors,
        scale: float,
        dropout: float = 0.0,
        adapter_name: str = "default",
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.d_out, self.d_in = weight_shape(base_layer)
        self.fan_in_fan_out = not isinstance(base_layer, nn.Linear)  # Conv1D stores (d_in, d_out)
        self.lotr_cores = nn.ParameterDict()
        self._factors_of: dict[str, LoTRFactors] = {}  # a plain dict: not registered as submodules
        self.scales: dict[str, float] = {}
        self._plans: dict[str, BatchedPlan] = {}
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self._has_dropout = dropout > 0  # skips calling the Identity: a module call costs microseconds
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.active = True  # False inside LoTRModel.disable_adapter()
        self.batch_adapters: list[str] | None = None  # one adapter name per sample, during a mixed batch
        self.add_adapter(adapter_name, factors, scale)
        self.active_adapters = [adapter_name]

    # --- named adapters -------------------------------------------------------------------
    def add_adapter(self, name: str, factors: LoTRFactors, scale: float) -> None:
        """Give adapter ``name`` a zero core (r_out, r_in) here, on the group's ``factors``."""
        if name in self.lotr_cores:
            raise ValueError(f"the layer already has an adapter {name!r}")
        r_out, r_in = factors.rank
        dtype, device = factors.out_factor.dtype, factors.out_factor.device
        self.lotr_cores[name] = nn.Parameter(torch.zeros(r_out, r_in, dtype=dtype, device=device))
        self._factors_of[name] = factors
        self.scales[name] = float(scale)
        shapes = ((self.d_out, r_out), (r_out, r_in), (self.d_in, r_in), (1, self.d_in))
        self._plans[name] = plan_batched(ADAPTER_FORWARD, shapes, (3, 0))

    def delete_adapter(self, name: str) -> None:
        """Remove adapter ``name``'s core and references from this layer."""
        if name in self.merged_adapters:
            raise RuntimeError(f"adapter {name!r} is merged into {type(self.base_layer).__name__}; unmerge it first")
        del self.lotr_cores[name]
        for table in (self._factors_of, self.scales, self._plans):
            table.pop(name, None)
        self.active_adapters = [a for a in self.active_adapters if a != name]

    @property
    def adapter_names(self) -> list[str]:
        return list(self.lotr_cores.keys())

    def _primary(self) -> str:
        """The adapter that ``lotr_core``, ``factors`` and ``scale`` refer to: the first active one."""
        for name in self.active_adapters:
            if name in self.lotr_cores:
                return name
        return next(iter(self.lotr_cores.keys()))

    @property
    def lotr_core(self) -> nn.Parameter:
        """The core (r_out, r_in) of the first active adapter."""
        return self.lotr_cores[self._primary()]

    @property
    def factors(self) -> LoTRFactors:
        """The group factors of the first active adapter."""
        return self._factors_of[self._primary()]

    def factors_of(self, name: str) -> LoTRFactors:
        """The group factors of adapter ``name``."""
        return self._factors_of[name]

    @property
    def scale(self) -> float:
        return self.scales[self._primary()]

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    # --- forward ---------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if not self.active:
            return result
        if self.batch_adapters is not None:
            return result + self.mixed_output(x, self.batch_adapters).to(result.dtype)
        for name in self.active_adapters:
            if name in self.lotr_cores and name not in self.merged_adapters:
                result = self._update(x, name, add_to=result)
        return result

    def _inputs(self, x: torch.Tensor, factors: LoTRFactors) -> torch.Tensor:
        inputs = self.dropout(x) if self._has_dropout else x
        if not torch.is_autocast_enabled(inputs.device.type):
            inputs = inputs.to(factors.in_factor.dtype)
        return inputs

    def adapter_output(self, x: torch.Tensor, adapter: str | None = None) -> torch.Tensor:
        """``scale * ((x V) G^T) U^T`` of ``adapter`` (default: the first active) for ``x`` (..., d_in).

        Returns (..., d_out), in the adapter's or autocast's dtype.
        """
        return self._update(x, adapter if adapter is not None else self._primary())

    def _update(self, x: torch.Tensor, name: str, add_to: torch.Tensor | None = None) -> torch.Tensor:
        """Adapter ``name``'s update for ``x`` (..., d_in), or ``add_to + update`` (``add_to`` (..., d_out)).

        When ``add_to`` has the dtype the products run in (the adapter's, or any under autocast),
        the last product adds into it and applies the scale as one ``addmm``; otherwise the scale
        goes on the r_out x r_in core and the update is cast to ``add_to``'s dtype and added.
        """
        factors = self._factors_of[name]
        inputs = self.dropout(x) if self._has_dropout else x
        device_type = inputs.device.type
        autocast = torch.is_autocast_enabled(device_type)
        if not autocast and inputs.dtype != factors.in_factor.dtype:
            inputs = inputs.to(factors.in_factor.dtype)
        rows = inputs.reshape(-1, self.d_in)
        scale = self.scales[name]
        fused = add_to is not None and (autocast or add_to.dtype == rows.dtype)
        core = self.lotr_cores[name]
        operands = [factors.out_factor, core if fused else scale * core, factors.in_factor, rows]
        path = self._plans[name].path(rows.shape[0])
        known = None
        shared = factors.shared_input
        # (is_compiling first: a symbolic row count is never compared with SHARE_MIN_ROWS)
        if shared.depth and not torch.compiler.is_compiling() and rows.shape[0] >= SHARE_MIN_ROWS:
            step = find_step(path, INPUT_PRODUCT)
            if step is not None and not self._dropout_active():
                key = self._sharing_key(x, factors, device_type)
                popped = [operands[min(s)] for s in step.inputs]  # V and x themselves
                known = {INPUT_PRODUCT: shared.get(x, key, lambda: step.apply(*popped))}
        if fused:
            out = execute(path, operands, known, add_to=add_to.reshape(-1, self.d_out), alpha=scale)
            return out.reshape(add_to.shape)
        delta = execute(path, operands, known).reshape(*x.shape[:-1], self.d_out)
        return delta if add_to is None else add_to + delta.to(add_to.dtype)

    def mixed_output(self, x: torch.Tensor, names: list[str]) -> torch.Tensor:
        """The update of a mixed batch: sample ``i`` of ``x`` (B, ..., d_in) gets adapter ``names[i]``'s.

        Samples of adapters that share factors (a zoo) are computed together: ``x V`` once for all
        of them, then each sample's scaled core by a gather and a batched matmul, then ``U`` once,
        so the cost does not grow with the number of distinct adapters. ``"__base__"`` (and an
        adapter this layer lacks) adds nothing. Returns (B, ..., d_out).
        """
        if len(names) != x.shape[0]:
            raise ValueError(f"adapter_names has {len(names)} entries for a batch of {x.shape[0]} samples")
        merged = sorted({n for n in names if n in self.merged_adapters})
        if merged:
            raise RuntimeError(f"adapters {merged} are merged; unmerge them before serving a mixed batch")
        by_factors: dict[int, tuple[LoTRFactors, list[int], list[str]]] = {}
        for i, name in enumerate(names):
            if name == BASE_ADAPTER or name not in self.lotr_cores:
                continue
            factors = self._factors_of[name]
            entry = by_factors.setdefault(id(factors), (factors, [], []))
            entry[1].append(i)
            entry[2].append(name)
        out = None
        for factors, samples, adapters in by_factors.values():
            index = torch.tensor(samples, device=x.device)
            inputs = self._inputs(x.index_select(0, index), factors)
            rows = inputs.reshape(len(samples), -1, self.d_in)  # (n, T, d_in)
            distinct = list(dict.fromkeys(adapters))
            cores = torch.stack([self.scales[a] * self.lotr_cores[a] for a in distinct])  # (k, r_out, r_in)
            which = torch.tensor([distinct.index(a) for a in adapters], device=x.device)
            projected = (rows @ factors.in_factor) @ cores.index_select(0, which).transpose(1, 2)  # (n, T, r_out)
            update = (projected @ factors.out_factor.T).reshape(len(samples), *x.shape[1:-1], self.d_out)
            if out is None:
                out = update.new_zeros(*x.shape[:-1], self.d_out)
            out = out.index_copy(0, index, update.to(out.dtype))
        if out is None:
            return x.new_zeros(*x.shape[:-1], self.d_out)
        return out

    def _dropout_active(self) -> bool:
        return isinstance(self.dropout, nn.Dropout) and self.dropout.training and self.dropout.p > 0

    @staticmethod
    def _sharing_key(x: torch.Tensor, factors: LoTRFactors, device_type: str) -> tuple[Any, ...]:
        """What must match for two layers to share ``x V``: the input's and V's versions, grad and autocast modes."""
        version = None if x.is_inference() else x._version  # inference tensors keep no version counter
        autocast = torch.is_autocast_enabled(device_type)
        return (
            version,
            factors.in_factor._version,
            torch.is_grad_enabled(),
            autocast,
            torch.get_autocast_dtype(device_type) if autocast else None,
        )

    # --- merging -----------------------------------------------------------------------------
    def delta_weight(self, dtype: torch.dtype | None = None, adapter: str | None = None) -> torch.Tensor:
        """``scale * U G V^T`` of ``adapter`` (default: the first active), (d_out, d_in), in ``dtype``."""
        name = adapter if adapter is not None else self._primary()
        factors = self._factors_of[name]
        u, g, v = factors.out_factor, self.lotr_cores[name], factors.in_factor
        if dtype is not None:
            u, g, v = u.to(dtype), g.to(dtype), v.to(dtype)
        return self.scales[name] * (u @ g @ v.T)

    @torch.no_grad()
    def _add_to_base(self, sign: float, adapter: str) -> None:
        """Add ``sign * delta_weight(adapter)`` to the base weight, computed in float32 or wider.

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
        core = self.lotr_cores[adapter]
        work = torch.promote_types(torch.promote_types(weight.dtype, core.dtype), torch.float32)
        set_dense_weight(base, weight.to(work) + sign * self.delta_weight(work, adapter))

    def merge(self, adapters: list[str] | None = None) -> None:
        """Add the updates of ``adapters`` (default: the active ones) into the base weight."""
        for name in adapters if adapters is not None else self.active_adapters:
            if name in self.lotr_cores and name not in self.merged_adapters:
                self._add_to_base(1.0, name)
                self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Subtract every merged update from the base weight again."""
        while self.merged_adapters:
            self._add_to_base(-1.0, self.merged_adapters.pop())

    def extra_repr(self) -> str:
        adapters = ", ".join(f"{n}: rank={self._factors_of[n].rank}, scale={self.scales[n]:g}" for n in self.lotr_cores)
        return f"{adapters}; active={self.active_adapters}, merged={self.merged_adapters}"
