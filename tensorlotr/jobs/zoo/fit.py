"""The zoo's shared-basis fit: each group's Tucker-2 over every adapter's layers, fair to each adapter.

For each group, the layers of every adapter that has it are stacked and decomposed at once:
one ``U`` (d_out, r_out) and ``V`` (d_in, r_in) for the group, a core per adapter and layer.
The weight objective at a given rank takes the randomized range finder of the factored stack
(:class:`tensorlotr.core.FactoredStack`: the layers stay in their stored dtype and are read in
batches, each adapter's error comes from small Gram matrices), ``method="exact"`` the exact
HOSVD of :func:`tensorlotr.tucker2_lowrank` in memory, as do ``energy``, HOOI sweeps and
calibration statistics (:func:`tensorlotr.core.tucker2_weighted`). With ``fairness="relative"`` each adapter's
layers are weighted by the inverse of its own (output) energy, so the basis minimises the sum
of the adapters' relative errors; with ``min_retention`` adapters that keep less of their
energy are weighted up, round after round, and if that is not enough the group's rank is
raised (:func:`fit_group`). :func:`fit_zoo` does this for every group and assembles the zoo.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ...adapter import group_modules, module_order
from ...adapter.layout import (
    IN_FACTOR,
    OUT_FACTOR,
    GroupLayout,
    ZooAdapter,
    ZooFiles,
    factor_key,
    zoo_core_key,
    zoo_saved_key,
)
from ...core import FactoredStack, Tucker2, max_rank, tucker2_lowrank, tucker2_weighted
from ...progress import Progress
from ..calibration import Calibration, ErrorSums, error_sums
from .report import PairErrors
from .sources import Layers, Source

if TYPE_CHECKING:
    from ...nn.calibration import CalibrationStats

#: The fairness options of :func:`tensorlotr.zoo.compress_zoo`.
FAIRNESS = ("relative", "none")
#: How a group's bases are fitted (:class:`Objective`'s ``method``).
METHODS = ("randomized", "exact")


@dataclass
class Objective:
    """How each group's basis is fitted: calibration statistics, fairness and the retention guarantee.

    Examples
    --------
    Two layers ``B_l`` (6, 2), ``A_l`` (2, 5) at rank (2, 2), the second weighted 4 times the first:

    >>> import torch
    >>> bs = [torch.randn(6, 2, dtype=torch.float64) for _ in range(2)]
    >>> as_ = [torch.randn(2, 5, dtype=torch.float64) for _ in range(2)]
    >>> tucker = Objective().fit((bs, as_, [1.0, 1.0]), None, (2, 2), None, 0, [1.0, 4.0])
    >>> tucker.rank, tuple(tucker.core.shape)
    ((2, 2), (2, 2, 2))
    """

    stats: CalibrationStats | None = None
    calibration: Calibration | None = None
    fairness: str = "none"
    min_retention: float | None = None
    max_rounds: int = 6  # reweighting rounds before the rank is raised
    #: "randomized": :meth:`tensorlotr.core.FactoredStack.tucker2` where it applies (:meth:`randomized`);
    #: "exact": always :func:`tensorlotr.tucker2_lowrank` (the HOSVD of the stack in memory)
    method: str = "randomized"
    oversample: int = 16  # sketch columns beyond the rank, randomized route
    n_power: int = 1  # power passes, randomized route

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")

    def randomized(self, calibrated: bool, energy: float | None, n_iter: int) -> bool:
        """Whether a group takes the randomized route: asked for, the weight objective, a fixed rank, no HOOI.

        >>> Objective().randomized(False, None, 0), Objective(method="exact").randomized(False, None, 0)
        (True, False)
        """
        return self.method == "randomized" and not calibrated and energy is None and n_iter == 0

    def fit(
        self,
        layers: Layers,
        factors: list[torch.Tensor] | None,
        rank: tuple[int, int] | None,
        energy: float | None,
        n_iter: int,
        weights: list[float],
    ) -> Tucker2:
        """The group's Tucker-2 minimising ``sum_l w_l ||(dW_l - U G_l V^T) [C_l^{1/2}]||^2``."""
        bs, as_, scales = layers
        if factors is None or (self.calibration is not None and self.calibration.objective == "weight"):
            if len(set(weights)) == 1:
                return tucker2_lowrank(bs, as_, rank, scale=scales, energy=energy, n_iter=n_iter)
            # per-layer weights on the weight error: scale the layers, then the cores back
            roots = [math.sqrt(w) for w in weights]
            scaled = tucker2_lowrank(
                bs, as_, rank, scale=[s * r for s, r in zip(scales, roots, strict=True)], energy=energy, n_iter=n_iter
            )
            core = torch.as_tensor(scaled.core) / torch.tensor(roots, dtype=torch.float64)[:, None, None]
            return Tucker2(core, scaled.out_factor, scaled.in_factor)
        assert self.calibration is not None
        return tucker2_weighted(
            bs, as_, factors, rank, scale=scales, layer_weights=weights, energy=energy,
            damping=self.calibration.damping, n_iter=self.calibration.n_iter,
        )  # fmt: skip


@dataclass
class Part:
    """One adapter's share of a group: its modules there (in stack order) and their layers."""

    adapter: str
    modules: list[str]
    layers: Layers

    def error_sums(self, tucker: Tucker2, factor_of: dict[str, torch.Tensor] | None) -> ErrorSums:
        """The :class:`ErrorSums` of ``tucker`` (this part's cores and the shared factors) against its layers."""
        return error_sums(tucker, *self.layers, [factor_of[m] for m in self.modules] if factor_of else None)


def pieces(tucker: Tucker2, parts: list[Part]) -> Iterator[tuple[Part, Tucker2]]:
    """Each part with its share of ``tucker``: its cores (in the parts' order) and the shared factors."""
    core, offset = torch.as_tensor(tucker.core), 0
    for part in parts:
        yield part, Tucker2(core[offset : offset + len(part.modules)], tucker.out_factor, tucker.in_factor)
        offset += len(part.modules)


def fit_group(
    objective: Objective,
    parts: list[Part],
    factor_of: dict[str, torch.Tensor] | None,
    rank: tuple[int, int] | None,
    exact: tuple[int, int],
    energy: float | None,
    n_iter: int,
) -> tuple[Tucker2, dict[str, ErrorSums]]:
    """One group's Tucker-2 and each adapter's error sums, with the fairness weights and the retention guarantee.

    ``factor_of`` gives each module's calibration factor ``Z_l`` (None: the weight error);
    ``exact`` is the group's exact rank, the highest a raised rank goes.

    Examples
    --------
    Two adapters of one layer each, ``B`` (6, 2), ``A`` (2, 5), at their exact rank:

    >>> import torch
    >>> layers = lambda: ([torch.randn(6, 2, dtype=torch.float64)], [torch.randn(2, 5, dtype=torch.float64)], [1.0])
    >>> parts = [Part("a", ["layer.0.q"], layers()), Part("b", ["layer.0.q"], layers())]
    >>> tucker, sums = fit_group(Objective(fairness="relative"), parts, None, (4, 4), (4, 4), None, 0)
    >>> tucker.rank, sorted(sums), sums["a"].weight_error < 1e-10
    ((4, 4), ['a', 'b'], True)
    """

    def share_lost(sums: ErrorSums) -> float:  # 1 - retention: the relative (output) error squared
        error = sums.output_error if sums.output_error is not None else sums.weight_error
        return error**2

    layers = _stacked(parts)
    ends = list(itertools.accumulate(len(part.modules) for part in parts))
    spans = [slice(end - len(part.modules), end) for part, end in zip(parts, ends, strict=True)]
    if objective.randomized(factor_of is not None, energy, n_iter):
        stack = FactoredStack(*layers)
        norms = stack.norms_sq()

        def own_energy(i: int, part: Part) -> float:
            return float(norms[spans[i]].sum())

        def fit(current: tuple[int, int] | None, weights: list[float]) -> tuple[Tucker2, dict[str, ErrorSums]]:
            found = stack.tucker2(
                current or exact, layer_weights=weights, oversample=objective.oversample, n_power=objective.n_power
            )
            sums = {
                part.adapter: ErrorSums(float(found.residual_sq[span].sum()), float(found.norm_sq[span].sum()))
                for part, span in zip(parts, spans, strict=True)
            }
            return found.tucker, sums

    else:
        factors = [factor_of[m] for part in parts for m in part.modules] if factor_of is not None else None

        def own_energy(i: int, part: Part) -> float:
            bs, as_, _ = part.layers
            own = part.error_sums(_empty(bs[0], as_[0], len(part.modules)), factor_of)
            return own.output_ref if own.output_ref is not None else own.weight_ref

        def fit(current: tuple[int, int] | None, weights: list[float]) -> tuple[Tucker2, dict[str, ErrorSums]]:
            tucker = objective.fit(layers, factors, current, energy, n_iter, weights)
            return tucker, {part.adapter: part.error_sums(piece, factor_of) for part, piece in pieces(tucker, parts)}

    adapter_weight = {part.adapter: 1.0 for part in parts}
    if objective.fairness == "relative":
        for i, part in enumerate(parts):
            energy_a = own_energy(i, part)
            adapter_weight[part.adapter] = 1.0 / energy_a if energy_a > 0 else 1.0
    scale = len(adapter_weight) / sum(adapter_weight.values())
    adapter_weight = {k: w * scale for k, w in adapter_weight.items()}
    current = rank
    budget = 1.0 - objective.min_retention if objective.min_retention is not None else None
    while True:
        for _ in range(objective.max_rounds if budget is not None else 1):
            weights = [adapter_weight[part.adapter] for part in parts for _ in part.modules]
            tucker, sums = fit(current, weights)
            if budget is None:
                return tucker, sums
            short = {name: share_lost(e) / budget for name, e in sums.items() if share_lost(e) > budget}
            if not short:
                return tucker, sums
            for name, ratio in short.items():  # weight up the adapters that keep too little
                adapter_weight[name] *= ratio
        r_out, r_in = tucker.rank
        if (r_out, r_in) == exact:
            return tucker, sums
        current = (min(exact[0], r_out + max(1, r_out // 4)), min(exact[1], r_in + max(1, r_in // 4)))


def _stacked(parts: list[Part]) -> Layers:
    """Every part's layers in one stack, in the parts' order."""
    return (
        [b for part in parts for b in part.layers[0]],
        [a for part in parts for a in part.layers[1]],
        [s for part in parts for s in part.layers[2]],
    )


def _empty(b: torch.Tensor, a: torch.Tensor, n_layers: int) -> Tucker2:
    """A rank-1 Tucker2 of zeros for ``n_layers`` layers of ``b``'s and ``a``'s shapes: its error is the norm."""
    return Tucker2(
        torch.zeros(n_layers, 1, 1, dtype=torch.float64),
        torch.zeros(int(b.shape[0]), 1, dtype=torch.float64),
        torch.zeros(int(a.shape[1]), 1, dtype=torch.float64),
    )


def fit_zoo(
    sources: dict[str, Source],
    shapes: dict[str, tuple[int, int]],
    rank: tuple[int, int] | None,
    energy: float | None,
    n_iter: int,
    groups: str | dict[str, list[str]],
    progress: Progress,
    objective: Objective | None = None,
) -> tuple[ZooFiles, PairErrors, list[str]]:
    """The zoo of ``sources``; the error sums per (adapter, group) after compression; notes on raised ranks.

    ``shapes`` holds every module's ``(d_out, d_in)`` across the sources, ``groups`` the
    grouping rule (as in :func:`tensorlotr.adapter.group_modules`); ``rank=None`` keeps each
    group's exact rank.

    Examples
    --------
    ``lora-a/`` and ``lora-b/`` hold rank-4 LoRAs on ``q_proj`` and ``v_proj`` of one 2-layer
    base of hidden size 32:

    >>> from tensorlotr.progress import no_progress
    >>> from tensorlotr.jobs.zoo.sources import check_same_base, read_source
    >>> sources = {"a": read_source("lora-a"), "b": read_source("lora-b")}
    >>> zoo, errors, notes = fit_zoo(sources, check_same_base(sources), (8, 8), None, 0, "by_name", no_progress)
    >>> sorted(zoo.groups), zoo.groups["q_proj"].rank, sorted(zoo.adapters)
    (['q_proj', 'v_proj'], (8, 8), ['a', 'b'])
    >>> 0 < errors[("a", "q_proj")]["compressed"].weight_error < 1
    True
    """
    objective = objective or Objective()
    layouts: dict[str, GroupLayout] = {}
    tensors: dict[str, torch.Tensor] = {}
    members = {name: ZooAdapter(s.path, {}, s.n_params) for name, s in sources.items()}
    errors: PairErrors = {}
    notes: list[str] = []
    ordered = dict(sorted(shapes.items(), key=lambda item: module_order(item[0])))
    plan = group_modules(ordered, groups)
    for group in progress(plan, "compressing", len(plan)):
        factor_of = {m: objective.stats.factor(m) for m in group.modules} if objective.stats is not None else None
        stored = objective.randomized(factor_of is not None, energy, n_iter)  # half precision stays so
        parts = []
        for name, source in sources.items():
            modules = [m for m in group.modules if m in source.modules]
            if modules:
                parts.append(Part(name, modules, source.load(modules, stored=stored)))
        n_layers = sum(len(part.modules) for part in parts)
        total = sum(int(b.shape[1]) for part in parts for b in part.layers[0])
        bound_out, bound_in = max_rank(n_layers, group.shape)
        exact = (min(bound_out, total), min(bound_in, total))
        clipped = None if rank is None else (min(rank[0], exact[0]), min(rank[1], exact[1]))
        tucker, sums = fit_group(objective, parts, factor_of, clipped, exact, energy, n_iter)
        if objective.min_retention is not None and energy is None and clipped is not None and tucker.rank != clipped:
            notes.append(
                f"group {group.name}: rank raised from {clipped[0]}x{clipped[1]} to {tucker.rank[0]}x{tucker.rank[1]} "
                f"so that every adapter keeps {objective.min_retention:.0%} of its energy"
            )
        u, v = torch.as_tensor(tucker.out_factor), torch.as_tensor(tucker.in_factor)
        tensors[factor_key(group.name, OUT_FACTOR)] = u.float().contiguous()
        tensors[factor_key(group.name, IN_FACTOR)] = v.float().contiguous()
        for part, piece in pieces(tucker, parts):
            for module, c in zip(part.modules, torch.as_tensor(piece.core), strict=True):
                tensors[zoo_core_key(part.adapter, module)] = c.float().contiguous()
            members[part.adapter].groups[group.name] = part.modules
            errors[(part.adapter, group.name)] = {"compressed": sums[part.adapter]}
        fan_in_fan_out = any(sources[part.adapter].fan_in_fan_out for part in parts)
        layouts[group.name] = GroupLayout(list(group.modules), group.shape, tucker.rank, 1.0, fan_in_fan_out)
    for name, source in sources.items():
        store_modules_to_save(tensors, name, members[name], source.load_modules_to_save())
        mine = [e["compressed"] for (adapter, _), e in errors.items() if adapter == name]
        members[name].relative_error = sum(mine, ErrorSums()).weight_error
    bases = {s.base for s in sources.values() if s.base}
    return ZooFiles(layouts, members, tensors, {"name_or_path": bases.pop() if bases else None}), errors, notes


def store_modules_to_save(
    tensors: dict[str, torch.Tensor], name: str, entry: ZooAdapter, saved: dict[str, torch.Tensor]
) -> None:
    """Put adapter ``name``'s ``modules_to_save`` tensors ``saved`` (by parameter path) in a zoo's ``tensors``.

    ``entry`` (the adapter's record in the zoo) lists their modules.

    Examples
    --------
    >>> import torch
    >>> tensors, entry = {}, ZooAdapter("lora-a", {})
    >>> store_modules_to_save(tensors, "a", entry, {"classifier.weight": torch.zeros(2, 8)})
    >>> sorted(tensors), entry.modules_to_save
    (['adapters.a.modules_to_save.classifier.weight'], ['classifier'])
    """
    for key, tensor in saved.items():
        tensors[zoo_saved_key(name, key)] = tensor
    entry.modules_to_save = sorted({key.rsplit(".", 1)[0] for key in saved})
