"""Adapter layers: the factors a group shares (:class:`LoTRFactors`) and the wrapped layer (:class:`LoTRLayer`).

The adapter's forward ``((x V) G^T) U^T`` is one einsum, ``ADAPTER_FORWARD``, planned when a
layer gets an adapter (:func:`tensorlotr.nn.planner.plan_batched`) and run as plain matrix
products (:func:`tensorlotr.nn.planner.execute`); layers of a group that read the same input
share ``x V`` (:mod:`tensorlotr.nn.sharing`).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import nn

from .planner import BatchedPlan, execute, find_step, plan_batched
from .sharing import SHARE_MIN_ROWS, SharedInputProduct
from .targets import dense_weight, quantization, set_dense_weight, weight_shape

__all__ = ["ADAPTER_FORWARD", "BASE_ADAPTER", "DEFAULT_ADAPTER", "LoTRFactors", "LoTRLayer", "check_adapter_name"]

#: U (d_out, r_out), G (r_out, r_in), V (d_in, r_in), x (N, d_in) -> (N, d_out). This operand
#: order makes opt_einsum's plan compute x V (N, r_in) and (U G)^T (r_in, d_out) as row-major
#: GEMMs with no transposed intermediates: 1.3-1.5x faster forward+backward than other orders.
ADAPTER_FORWARD = "mo,oi,ni,bn->bm"
#: The operands of ``ADAPTER_FORWARD`` that ``x V`` is computed from: V and x.
INPUT_PRODUCT = frozenset({2, 3})
#: The name PEFT gives a sample that runs without any adapter in a mixed batch.
BASE_ADAPTER = "__base__"
#: The name of the adapter a layer (and :func:`tensorlotr.get_lotr_model`) starts with.
DEFAULT_ADAPTER = "default"


def check_adapter_name(name: str) -> None:
    """Refuse (``ValueError``) a name that cannot key an adapter's cores in a layer's ``ParameterDict``.

    Examples
    --------
    >>> check_adapter_name("legal")
    >>> check_adapter_name("a.b")
    Traceback (most recent call last):
    ...
    ValueError: adapter names must be non-empty, without '.' or '/', and not '__base__'; got 'a.b'
    """
    if not isinstance(name, str) or not name or "." in name or "/" in name or name == BASE_ADAPTER:
        raise ValueError(f"adapter names must be non-empty, without '.' or '/', and not {BASE_ADAPTER!r}; got {name!r}")
    if hasattr(nn.ParameterDict, name) or hasattr(nn.ModuleDict, name):  # the cores are a ParameterDict by name
        raise ValueError(f"adapter name {name!r} is the name of a torch container method; choose another")


# --- modules ------------------------------------------------------------------------------


class LoTRFactors(nn.Module):
    """The factors shared by every layer of a group: ``U`` (d_out, r_out) and ``V`` (d_in, r_in).

    Examples
    --------
    >>> factors = LoTRFactors(32, 24, (4, 2))  # random orthonormal columns
    >>> tuple(factors.out_factor.shape), tuple(factors.in_factor.shape), factors.rank
    ((32, 4), (24, 2), (4, 2))
    """

    def __init__(self, d_out: int, d_in: int, rank: tuple[int, int], dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        r_out, r_in = rank
        self.out_factor = nn.Parameter(torch.empty(d_out, r_out, dtype=dtype))
        self.in_factor = nn.Parameter(torch.empty(d_in, r_in, dtype=dtype))
        self.shared_input = SharedInputProduct()
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
        """Gaussian factors with standard deviation ``1/sqrt(d)``: columns of about unit norm (the original code: 1)."""
        for factor in (self.out_factor, self.in_factor):
            factor.normal_(0.0, 1.0 / math.sqrt(factor.shape[0]))

    def extra_repr(self) -> str:
        return f"d_out={self.out_factor.shape[0]}, d_in={self.in_factor.shape[0]}, rank={self.rank}"


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

    As PEFT's layers do, the layer exposes its base layer's ``weight`` and ``bias``,
    ``in_features`` and ``out_features``, and ``get_base_layer()``: model code that reads them
    through the module it called (T5's feed-forward reads ``self.wo.weight.dtype``) runs unchanged.

    Examples
    --------
    A Linear of (d_out, d_in) = (32, 24) with rank-(4, 2) factors; its core starts at zero, so
    the layer computes what the Linear does:

    >>> import torch
    >>> linear = torch.nn.Linear(24, 32)
    >>> layer = LoTRLayer(linear, LoTRFactors(32, 24, (4, 2)), scale=2.0)
    >>> tuple(layer.lotr_core.shape), layer.adapter_names
    ((4, 2), ['default'])
    >>> layer.weight is linear.weight, layer.bias is linear.bias, (layer.in_features, layer.out_features)
    (True, True, (24, 32))
    >>> x = torch.randn(3, 24)
    >>> torch.equal(layer(x), linear(x))
    True
    >>> _ = torch.nn.init.normal_(layer.lotr_core)  # as if trained: y = W x + b + 2 U G V^T x
    >>> torch.allclose(layer(x), linear(x) + x @ layer.delta_weight().T, atol=1e-5)
    True
    """

    is_lotr_layer = True

    def __init__(
        self,
        base_layer: nn.Module,
        factors: LoTRFactors,
        scale: float,
        dropout: float = 0.0,
        adapter_name: str = DEFAULT_ADAPTER,
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
        core: nn.Parameter = self.lotr_cores[self._primary()]
        return core

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

    # --- the base layer's attributes, as PEFT's layers expose them ----------------------------
    def get_base_layer(self) -> nn.Module:
        """The wrapped layer (through any nesting of adapter layers), as PEFT's ``BaseTunerLayer.get_base_layer``."""
        base: nn.Module = self
        while isinstance(inner := getattr(base, "base_layer", None), nn.Module):
            base = inner
        return base

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight (a GPTQ layer's ``qweight``), as stored: model code reads it (T5's ``wo.weight``)."""
        base = self.get_base_layer()
        weight = getattr(base, "qweight", None)
        if weight is None:
            weight = base.weight
        assert isinstance(weight, torch.Tensor)
        return weight

    @property
    def bias(self) -> torch.Tensor | None:
        """The base layer's bias (None without one)."""
        bias: torch.Tensor | None = getattr(self.get_base_layer(), "bias", None)
        return bias

    @property
    def in_features(self) -> int:
        """``d_in`` of the base layer (a Conv1D's too, though it stores its weight (d_in, d_out))."""
        return self.d_in

    @property
    def out_features(self) -> int:
        """``d_out`` of the base layer."""
        return self.d_out

    # --- forward ---------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result: torch.Tensor = self.base_layer(x, *args, **kwargs)
        if not self.active:
            return result
        if self.batch_adapters is not None:
            mixed: torch.Tensor = result + self.mixed_output(x, self.batch_adapters).to(result.dtype)
            return mixed
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
        if fused and add_to is not None:
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
        u: torch.Tensor = factors.out_factor
        g: torch.Tensor = self.lotr_cores[name]
        v: torch.Tensor = factors.in_factor
        if dtype is not None:
            u, g, v = u.to(dtype), g.to(dtype), v.to(dtype)
        delta: torch.Tensor = self.scales[name] * (u @ g @ v.T)
        return delta

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
