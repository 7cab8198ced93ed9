"""What a LoTR adapter is, independent of files and modules: its groups and tensors.

This module owns the tensor key names of an adapter, in both directions:

- ``factors.<group>.out_factor`` (d_out, r_out) and ``factors.<group>.in_factor`` (d_in, r_in),
  once per group;
- ``cores.<module path>`` (r_out, r_in), one per adapted module;
- ``modules_to_save.<parameter path>``, full tensors of the modules trained in full.

The torch bindings and the jobs build and consume :class:`LoTRAdapterFiles`;
:mod:`tensorlotr.io.lotr_format` writes and reads it as ``lotr_config.json`` and
``lotr_model.safetensors``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..core import Tucker2
from .config import LoTRConfig

OUT_FACTOR = "out_factor"
IN_FACTOR = "in_factor"
_FACTORS, _CORES, _SAVED = "factors.", "cores.", "modules_to_save."


def factor_key(group: str, which: str) -> str:
    """The key of a group's ``out_factor`` (U, (d_out, r_out)) or ``in_factor`` (V, (d_in, r_in)).

    Examples
    --------
    >>> factor_key("query", "out_factor")
    'factors.query.out_factor'
    """
    if which not in (OUT_FACTOR, IN_FACTOR):
        raise ValueError(f"which must be {OUT_FACTOR!r} or {IN_FACTOR!r}, got {which!r}")
    return f"{_FACTORS}{group}.{which}"


def core_key(module: str) -> str:
    """The key of the core ``G_l`` (r_out, r_in) of the module at path ``module``.

    Examples
    --------
    >>> core_key("encoder.layer.0.attention.self.query")
    'cores.encoder.layer.0.attention.self.query'
    """
    return f"{_CORES}{module}"


def saved_key(parameter: str) -> str:
    """The key of a full tensor of ``modules_to_save``, by parameter path in the base model.

    Examples
    --------
    >>> saved_key("classifier.weight")
    'modules_to_save.classifier.weight'
    """
    return f"{_SAVED}{parameter}"


def saved_parameters(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The ``modules_to_save`` tensors of ``tensors``, by parameter path (the inverse of :func:`saved_key`)."""
    return {k[len(_SAVED) :]: v for k, v in tensors.items() if k.startswith(_SAVED)}


def expected_shapes(name: str, group: GroupLayout) -> dict[str, tuple[int, int]]:
    """Every tensor key of ``group`` with its shape: both factors and one core per module."""
    (d_out, d_in), (r_out, r_in) = group.shape, group.rank
    return {
        factor_key(name, OUT_FACTOR): (d_out, r_out),
        factor_key(name, IN_FACTOR): (d_in, r_in),
        **{core_key(m): (r_out, r_in) for m in group.modules},
    }


@dataclass
class GroupLayout:
    """One group as stored: modules in stack order, ``shape`` (d_out, d_in), ``rank`` (r_out, r_in),
    and the ``scale`` of its updates, ``dW_l = scale * U G_l V^T``.

    Examples
    --------
    >>> layout = GroupLayout(["layer.0.query", "layer.1.query"], shape=(6, 5), rank=(3, 2), scale=1.0)
    >>> layout.n_params  # 3*6 + 2*5 + 2*3*2
    40
    >>> GroupLayout.from_dict(layout.to_dict()) == layout
    True
    """

    modules: list[str]
    shape: tuple[int, int]
    rank: tuple[int, int]
    scale: float
    fan_in_fan_out: bool = False  # the modules store their weight (d_in, d_out), as GPT-2's Conv1D

    @property
    def n_params(self) -> int:
        """``r_out*d_out + r_in*d_in + L*r_out*r_in``."""
        (d_out, d_in), (r_out, r_in) = self.shape, self.rank
        return r_out * d_out + r_in * d_in + len(self.modules) * r_out * r_in

    def to_dict(self) -> dict[str, Any]:
        return {
            "modules": self.modules,
            "shape": list(self.shape),
            "rank": list(self.rank),
            "scale": self.scale,
            "fan_in_fan_out": self.fan_in_fan_out,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GroupLayout:
        return cls(
            list(data["modules"]),
            tuple(data["shape"]),
            tuple(data["rank"]),
            float(data["scale"]),
            bool(data.get("fan_in_fan_out", False)),
        )


@dataclass
class LoTRAdapterFiles:
    """An adapter in memory: the user's ``config``, the resolved ``groups``, and the tensors by key.

    The tensors are each group's ``U`` (d_out, r_out) and ``V`` (d_in, r_in), one core
    (r_out, r_in) per module, and the ``modules_to_save`` tensors; :class:`AdapterBuilder`
    builds one, :func:`tensorlotr.io.write_adapter` saves it and
    :func:`tensorlotr.io.read_adapter` loads it.

    Examples
    --------
    >>> import torch
    >>> layout = GroupLayout(["layer.0.query"], shape=(6, 5), rank=(3, 2), scale=1.0)
    >>> tensors = {
    ...     factor_key("query", "out_factor"): torch.zeros(6, 3),
    ...     factor_key("query", "in_factor"): torch.zeros(5, 2),
    ...     core_key("layer.0.query"): torch.zeros(3, 2),
    ... }
    >>> files = LoTRAdapterFiles({}, {"query": layout}, tensors)
    >>> tuple(files.factor("query", "in_factor").shape), tuple(files.core("layer.0.query").shape)
    ((5, 2), (3, 2))
    """

    config: dict[str, Any]
    groups: dict[str, GroupLayout]
    tensors: dict[str, torch.Tensor]
    base_model: dict[str, Any] = field(default_factory=dict)

    def factor(self, group: str, which: str) -> torch.Tensor:
        """``U`` (``which="out_factor"``, (d_out, r_out)) or ``V`` (``"in_factor"``, (d_in, r_in)) of ``group``."""
        return self.tensors[factor_key(group, which)]

    def core(self, module: str) -> torch.Tensor:
        """The core (r_out, r_in) of the module at path ``module``."""
        return self.tensors[core_key(module)]

    @property
    def modules_to_save(self) -> dict[str, torch.Tensor]:
        """Full tensors of the modules trained in full, by parameter path."""
        return saved_parameters(self.tensors)

    def tucker(self, group: str, modules: Sequence[str] | None = None, dtype: torch.dtype = torch.float64) -> Tucker2:
        """Group ``group`` as a :class:`tensorlotr.Tucker2` with the scale in its cores.

        Cores (L, r_out, r_in) for ``modules`` (default: all of the group's, in order),
        ``U`` (d_out, r_out) and ``V`` (d_in, r_in), all in ``dtype``.
        """
        layout = self.groups[group]
        names = list(modules if modules is not None else layout.modules)
        cores = torch.stack([layout.scale * self.core(m).to(dtype) for m in names])
        return Tucker2(cores, self.factor(group, OUT_FACTOR).to(dtype), self.factor(group, IN_FACTOR).to(dtype))

    def lora_factors(
        self, group: str, dtype: torch.dtype | None = None
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Group ``group`` seen as a LoRA at scale 1: ``{module: (B_l, A_l)}``, exactly.

        ``scale U G_l V^T = B_l A_l`` with rank ``r = min(r_out, r_in)``: for ``r_in <= r_out``
        ``B_l = scale U G_l`` (d_out, r) and ``A_l = V^T`` (r, d_in); otherwise ``B_l = U``
        and ``A_l = scale G_l V^T``. ``dtype`` defaults to the factors' own.
        """
        layout = self.groups[group]
        u, v = self.factor(group, OUT_FACTOR).detach(), self.factor(group, IN_FACTOR).detach()
        if dtype is not None:
            u, v = u.to(dtype), v.to(dtype)
        r_out, r_in = layout.rank
        out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for module in layout.modules:
            core = layout.scale * self.core(module).detach().to(u.dtype)
            b, a = (u @ core, v.T) if r_in <= r_out else (u, core @ v.T)
            out[module] = (b.contiguous(), a.contiguous())
        return out


class AdapterBuilder:
    """Collects groups' Tucker-2 tensors into a :class:`LoTRAdapterFiles` (convert and decompose).

    Examples
    --------
    A group of 2 layers of (d_out, d_in) = (6, 5) at rank (3, 2):

    >>> import numpy as np
    >>> import tensorlotr as tlr
    >>> tucker = tlr.tucker2(np.random.default_rng(0).standard_normal((2, 6, 5)), rank=(3, 2))
    >>> builder = AdapterBuilder()
    >>> builder.add_group("query", ["layer.0.query", "layer.1.query"], tucker, fan_in_fan_out=False)
    >>> files = builder.build(["query"], "by_name", [], {})
    >>> tuple(files.factor("query", "out_factor").shape), tuple(files.factor("query", "in_factor").shape)
    ((6, 3), (5, 2))
    >>> tuple(files.core("layer.0.query").shape)
    (3, 2)
    >>> files.config["rank_pattern"]
    {'query': [3, 2]}
    """

    def __init__(self) -> None:
        self.groups: dict[str, GroupLayout] = {}
        self.tensors: dict[str, torch.Tensor] = {}

    def add_group(
        self,
        name: str,
        modules: list[str],
        tucker: Tucker2,
        *,
        fan_in_fan_out: bool,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        """Store a group's factors and cores in ``dtype`` at scale 1 (the cores absorb every scale)."""
        core = torch.as_tensor(tucker.core).to(dtype)
        self.tensors[factor_key(name, OUT_FACTOR)] = torch.as_tensor(tucker.out_factor).to(dtype).contiguous()
        self.tensors[factor_key(name, IN_FACTOR)] = torch.as_tensor(tucker.in_factor).to(dtype).contiguous()
        for i, module in enumerate(modules):
            self.tensors[core_key(module)] = core[i].clone()
        d_out, d_in = int(tucker.out_factor.shape[0]), int(tucker.in_factor.shape[0])
        self.groups[name] = GroupLayout(list(modules), (d_out, d_in), tucker.rank, 1.0, fan_in_fan_out)

    def add_saved(self, parameters: dict[str, torch.Tensor]) -> list[str]:
        """Store full tensors of ``modules_to_save`` by parameter path; returns the module paths."""
        for key, tensor in parameters.items():
            self.tensors[saved_key(key)] = tensor
        return sorted({key.rsplit(".", 1)[0] for key in parameters})

    def build(
        self,
        target_modules: Any,
        groups: str | dict[str, list[str]],
        modules_to_save: list[str],
        base_model: dict[str, Any],
    ) -> LoTRAdapterFiles:
        """The adapter, with a config of per-group ranks and alpha = min(rank), so every scale is 1."""
        config = built_config(self.groups, target_modules, groups, modules_to_save)
        return LoTRAdapterFiles(config.to_dict(), dict(self.groups), dict(self.tensors), base_model)


def built_config(
    layouts: dict[str, GroupLayout],
    target_modules: Any,
    groups: str | dict[str, list[str]],
    modules_to_save: list[str],
) -> LoTRConfig:
    """The config of an adapter built from decompositions: per-group ranks, every scale 1 (alpha = min(rank))."""
    if not layouts:
        raise ValueError("the adapter has no groups")
    ranks = {name: (g.rank[0], g.rank[1]) for name, g in layouts.items()}
    first = next(iter(ranks.values()))
    return LoTRConfig(
        rank=first,
        alpha=float(min(first)),
        target_modules=target_modules or sorted({m for g in layouts.values() for m in g.modules}),
        groups=groups,
        modules_to_save=modules_to_save or None,
        rank_pattern=dict(ranks),
        alpha_pattern={name: float(min(r)) for name, r in ranks.items()},
    )


# --- the zoo: many adapters of one base sharing each group's factors ------------------------------


def zoo_core_key(adapter: str, module: str) -> str:
    """The key of adapter ``adapter``'s core for the module at path ``module``, in a zoo."""
    return f"adapters.{adapter}.{_CORES}{module}"


def zoo_saved_key(adapter: str, parameter: str) -> str:
    """The key of adapter ``adapter``'s ``modules_to_save`` tensor ``parameter``, in a zoo."""
    return f"adapters.{adapter}.{_SAVED}{parameter}"


def zoo_residual_key(adapter: str, group: str, which: str) -> str:
    """The key of adapter ``adapter``'s private factor in ``group`` (``out_factor`` (d_out, s_out) or ``in_factor``).

    Examples
    --------
    >>> zoo_residual_key("negation", "query", "in_factor")
    'adapters.negation.residual.query.in_factor'
    """
    if which not in (OUT_FACTOR, IN_FACTOR):
        raise ValueError(f"which must be {OUT_FACTOR!r} or {IN_FACTOR!r}, got {which!r}")
    return f"adapters.{adapter}.residual.{group}.{which}"


@dataclass
class ZooAdapter:
    """One adapter of a zoo: where it came from, its modules by group, and what compression cost it.

    ``groups`` maps a zoo group to this adapter's modules in it (a subset of the group's,
    in stack order); a group the adapter lacks is absent and costs nothing. ``residual`` maps
    a group to the rank ``(s_out, s_in)`` of the adapter's private residual there: its own
    factors ``U_a`` (d_out, s_out) and ``V_a`` (d_in, s_in) beside the shared ones, so that its
    layers are ``[U U_a] C_l [V V_a]^T`` with cores ``C_l`` (r_out + s_out, r_in + s_in).
    """

    source: str
    groups: dict[str, list[str]]
    lora_params: int = 0
    relative_error: float = 0.0
    modules_to_save: list[str] = field(default_factory=list)
    residual: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def modules(self) -> list[str]:
        return [m for modules in self.groups.values() for m in modules]

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "groups": self.groups,
            "lora_params": self.lora_params,
            "relative_error": self.relative_error,
            "modules_to_save": self.modules_to_save,
            **({"residual": {g: list(r) for g, r in self.residual.items()}} if self.residual else {}),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ZooAdapter:
        return cls(
            str(data["source"]),
            {str(g): list(m) for g, m in data["groups"].items()},
            int(data.get("lora_params", 0)),
            float(data.get("relative_error", 0.0)),
            list(data.get("modules_to_save", [])),
            {str(g): (int(r[0]), int(r[1])) for g, r in data.get("residual", {}).items()},
        )


@dataclass
class ZooFiles:
    """A zoo in memory: each group's shared factors, and per adapter its cores (scale 1).

    ``groups`` hold the union of every adapter's modules (``scale`` 1). Tensors: the shared
    factors under :func:`factor_key`, the cores under :func:`zoo_core_key`, each adapter's
    ``modules_to_save`` under :func:`zoo_saved_key`, and the private factors of an adapter
    with a residual (:attr:`ZooAdapter.residual`) under :func:`zoo_residual_key`.
    """

    groups: dict[str, GroupLayout]
    adapters: dict[str, ZooAdapter]
    tensors: dict[str, torch.Tensor]
    base_model: dict[str, Any] = field(default_factory=dict)

    @property
    def n_params(self) -> int:
        """Everything stored: the shared factors once, every adapter's cores and saved tensors."""
        return sum(t.numel() for t in self.tensors.values())

    def core_params(self, name: str) -> int:
        """Parameters that adapter ``name`` adds to the zoo: its cores, private residual factors and saved tensors."""
        prefix = f"adapters.{name}."
        return sum(t.numel() for k, t in self.tensors.items() if k.startswith(prefix))

    def rank_of(self, name: str, group: str) -> tuple[int, int]:
        """Adapter ``name``'s rank in ``group``: the shared rank plus its residual rank there."""
        (r_out, r_in), (s_out, s_in) = self.groups[group].rank, self.adapters[name].residual.get(group, (0, 0))
        return r_out + s_out, r_in + s_in

    def adapter(self, name: str) -> LoTRAdapterFiles:
        """Adapter ``name`` as a plain LoTR adapter (its groups, the shared factors, its cores), exactly.

        In a group where the adapter has a residual its factors are the shared ones with its
        private columns appended, ``[U U_a]`` and ``[V V_a]``, at rank :meth:`rank_of`.
        """
        if name not in self.adapters:
            raise KeyError(f"the zoo has no adapter {name!r}; adapters: {sorted(self.adapters)}")
        entry = self.adapters[name]
        groups, tensors = {}, {}
        for group, modules in entry.groups.items():
            layout = self.groups[group]
            rank = self.rank_of(name, group)
            groups[group] = GroupLayout(list(modules), layout.shape, rank, 1.0, layout.fan_in_fan_out)
            for which in (OUT_FACTOR, IN_FACTOR):
                shared = self.tensors[factor_key(group, which)]
                if group in entry.residual:
                    private = self.tensors[zoo_residual_key(name, group, which)]
                    shared = torch.cat([shared, private.to(shared.dtype)], dim=1)
                tensors[factor_key(group, which)] = shared
            for module in modules:
                tensors[core_key(module)] = self.tensors[zoo_core_key(name, module)]
        prefix = f"adapters.{name}.{_SAVED}"
        for key, tensor in self.tensors.items():
            if key.startswith(prefix):
                tensors[saved_key(key[len(prefix) :])] = tensor
        targets = sorted({m.rsplit(".", 1)[-1] for m in entry.modules})
        patterns = {g: list(m) for g, m in entry.groups.items()}
        config = built_config(groups, targets, patterns, entry.modules_to_save)
        return LoTRAdapterFiles(config.to_dict(), groups, tensors, dict(self.base_model))
