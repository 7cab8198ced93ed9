"""LoRA -> LoTR in memory: per-module LoRA factors, stacked by group, become a LoTR adapter (:func:`lora_to_lotr`).

The one conversion behind ``convert_lora`` (a PEFT LoRA folder, through
:class:`tensorlotr.io.peft_lora.PeftLoRA`), ``LoTRModel.from_lora`` and
``LoTRModel.from_peft_model`` (the LoRA layers of a live PEFT model, as :class:`LoRALayers`).
Each group's stack ``dW_l = s_l B_l A_l`` is decomposed in factored form
(:func:`tensorlotr.core.tucker2_lowrank`, or :func:`tensorlotr.core.tucker2_weighted` for the
output-aware objective), never forming a dense update.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from ..core import (
    Tucker2,
    clipped_rank_note,
    lowrank_norm_sq,
    max_rank,
    normalize_rank,
    relative_error_lowrank,
    tucker2_lowrank,
    tucker2_weighted,
    weighted_residuals_lowrank,
)
from .groups import Group, group_modules
from .layout import AdapterBuilder, LoTRAdapterFiles

__all__ = [
    "GroupConversion",
    "LoRAConversion",
    "LoRAFactors",
    "LoRALayers",
    "LoRASource",
    "OutputWeighting",
    "lora_to_lotr",
]


@dataclass(frozen=True)
class LoRAFactors:
    """One module's LoRA update ``dW = scale * B A``: ``B`` (d_out, r), ``A`` (r, d_in).

    Examples
    --------
    >>> import torch
    >>> lora = LoRAFactors(torch.zeros(6, 2), torch.zeros(2, 5), scale=2.0)
    >>> lora.shape, lora.rank, lora.n_params
    ((6, 5), 2, 22)
    """

    B: torch.Tensor
    A: torch.Tensor
    scale: float = 1.0

    @property
    def shape(self) -> tuple[int, int]:
        """``(d_out, d_in)`` of the update."""
        return int(self.B.shape[0]), int(self.A.shape[1])

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def n_params(self) -> int:
        return self.B.numel() + self.A.numel()


class LoRASource(Protocol):
    """A LoRA adapter to convert: :class:`LoRALayers` in memory, or a PEFT folder's ``PeftLoRA``.

    ``modules`` maps each adapted module's path to an object with ``shape`` (d_out, d_in),
    ``rank`` and ``n_params``, in layer order; ``load(names)`` returns ``(B_l, A_l, scale_l)``
    for ``names``, each a list; ``load_modules_to_save()`` the full tensors trained beside the
    LoRA, by parameter path; ``fan_in_fan_out`` is true for GPT-2 ``Conv1D`` layers; ``config``
    is PEFT's ``adapter_config`` (``target_modules``, ``base_model_name_or_path``, ``task_type``).

    Examples
    --------
    >>> import torch
    >>> source: LoRASource = LoRALayers({"layer.0.q": LoRAFactors(torch.zeros(6, 2), torch.zeros(2, 5))})
    >>> {name: module.shape for name, module in source.modules.items()}
    {'layer.0.q': (6, 5)}
    """

    @property
    def modules(self) -> Mapping[str, Any]: ...

    @property
    def config(self) -> Mapping[str, Any]: ...

    @property
    def fan_in_fan_out(self) -> bool: ...

    def load(self, names: list[str]) -> tuple[list[torch.Tensor], list[torch.Tensor], list[float]]: ...

    def load_modules_to_save(self) -> dict[str, torch.Tensor]: ...


class LoRALayers:
    """LoRA factors held in memory by module path (the layers of a live PEFT model): a :class:`LoRASource`.

    Examples
    --------
    >>> import torch
    >>> layers = LoRALayers({"layer.0.q": LoRAFactors(torch.ones(6, 2), torch.ones(2, 5), 0.5)})
    >>> bs, as_, scales = layers.load(["layer.0.q"])
    >>> tuple(bs[0].shape), tuple(as_[0].shape), scales
    ((6, 2), (2, 5), [0.5])
    """

    fan_in_fan_out = False  # the factors are given in (d_out, d_in) orientation

    def __init__(self, modules: Mapping[str, LoRAFactors], config: dict[str, Any] | None = None) -> None:
        self.modules: dict[str, LoRAFactors] = dict(modules)
        self.config: dict[str, Any] = dict(config or {})

    def load(self, names: list[str]) -> tuple[list[torch.Tensor], list[torch.Tensor], list[float]]:
        """``(B_l, A_l, scale_l)`` for ``names``: B (d_out, r), A (r, d_in)."""
        layers = [self.modules[n] for n in names]
        return [x.B for x in layers], [x.A for x in layers], [x.scale for x in layers]

    def load_modules_to_save(self) -> dict[str, torch.Tensor]:
        """None: a live model keeps its ``modules_to_save`` in place."""
        return {}


@dataclass(frozen=True)
class OutputWeighting:
    """The calibration of the output-aware route: each module's ``Z_l`` (d_in, k), ``Z_l Z_l^T = C_l``.

    ``factors(names)`` returns the ``Z_l`` of ``names``. With ``fit`` each group minimises its
    calibrated output error, ``sum_l ||(dW_l - U G_l V^T) Z_l||^2`` (:func:`tensorlotr.core.tucker2_weighted`
    with ``damping`` and ``n_iter``); without, the weight error as usual, and the ``Z_l`` only
    measure the output error.

    Examples
    --------
    >>> import torch
    >>> weighting = OutputWeighting(lambda names: [torch.eye(5) for _ in names], fit=False)
    >>> len(weighting.factors(["layer.0.q", "layer.1.q"]))
    2
    """

    factors: Callable[[Sequence[str]], list[torch.Tensor]]
    fit: bool = True
    damping: float = 1e-2
    n_iter: int = 10


@dataclass
class GroupConversion:
    """One group of :func:`lora_to_lotr`: its LoRA, the Tucker-2 it became, and the squared errors.

    ``norm_sq`` is ``sum_l ||dW_l||_F^2`` and ``error_sq`` ``sum_l ||dW_l - U G_l V^T||_F^2``; with
    an :class:`OutputWeighting`, ``output_sq`` and ``output_ref_sq`` are the same weighted by
    ``Z_l`` (``||(...) Z_l||_F^2``). ``tucker`` holds cores (L, r_out, r_in) with the scales in them,
    ``U`` (d_out, r_out) and ``V`` (d_in, r_in), in the compute dtype (float64 for float64 factors,
    else float32). ``lora_rank`` is the largest LoRA rank of the group's modules.

    Examples
    --------
    >>> import numpy as np
    >>> from tensorlotr.core import tucker2
    >>> tucker = tucker2(np.random.default_rng(0).standard_normal((2, 6, 5)), rank=(3, 2))
    >>> row = GroupConversion("q", ["l.0.q", "l.1.q"], (6, 5), tucker, 4.0, 1.0, 2, 44, 0.01)
    >>> row.layers, row.rank, row.lotr_params, row.relative_error
    (2, (3, 2), 40, 0.5)
    """

    group: str
    modules: list[str]
    shape: tuple[int, int]
    tucker: Tucker2
    norm_sq: float
    error_sq: float
    lora_rank: int
    lora_params: int
    seconds: float
    output_sq: float | None = None
    output_ref_sq: float | None = None

    @property
    def layers(self) -> int:
        return len(self.modules)

    @property
    def rank(self) -> tuple[int, int]:
        return self.tucker.rank

    @property
    def lotr_params(self) -> int:
        return self.tucker.n_params

    @property
    def relative_error(self) -> float:
        """``sqrt(error_sq / norm_sq)``; 0 for a zero update."""
        return math.sqrt(self.error_sq / self.norm_sq) if self.norm_sq > 0 else 0.0


@dataclass
class LoRAConversion:
    """What :func:`lora_to_lotr` built: the adapter, each group's conversion, and the report's notes.

    ``modules_to_save`` are the module paths of the full tensors carried over; ``notes`` name the
    groups kept below the rank asked for (:func:`tensorlotr.core.clipped_rank_note`).

    Examples
    --------
    >>> import torch
    >>> layers = LoRALayers({f"l.{i}.q": LoRAFactors(torch.randn(6, 2), torch.randn(2, 5)) for i in range(2)})
    >>> conversion = lora_to_lotr(layers, rank=8)  # above the exact rank, 2 + 2 = 4
    >>> conversion.notes
    ['group q: rank 8x8 is above its exact rank; kept 4x4']
    >>> conversion.relative_error < 1e-6, conversion.lora_params, conversion.lotr_params
    (True, 44, 76)
    """

    files: LoTRAdapterFiles
    groups: list[GroupConversion]
    modules_to_save: list[str]
    notes: list[str]

    @property
    def relative_error(self) -> float:
        """Over all groups: ``sqrt(sum_g error_sq / sum_g norm_sq)``; 0 when every update is zero."""
        norm_sq = sum(g.norm_sq for g in self.groups)
        return math.sqrt(sum(g.error_sq for g in self.groups) / norm_sq) if norm_sq > 0 else 0.0

    @property
    def lora_params(self) -> int:
        return sum(g.lora_params for g in self.groups)

    @property
    def lotr_params(self) -> int:
        return sum(g.lotr_params for g in self.groups)


def _compute_dtype(x: torch.Tensor) -> torch.Tensor:
    """``x`` in the dtype the conversion computes in: float64 stays, anything else is float32."""
    return x if x.dtype == torch.float64 else x.float()


def _padded(tucker: Tucker2, rank: tuple[int, int], generator: torch.Generator) -> Tucker2:
    """``tucker`` at a larger ``rank``: orthonormal factor columns added, zero core entries."""
    core, factors = tucker.core, []
    for factor, r in ((tucker.out_factor, rank[0]), (tucker.in_factor, rank[1])):
        d, k = factor.shape
        if r > k:
            fill = torch.randn(d, r - k, dtype=factor.dtype, generator=generator)
            fill -= factor @ (factor.T @ fill)
            extra, _ = torch.linalg.qr(fill)
            factor = torch.cat([factor, extra], dim=1)
        factors.append(factor)
    padded = core.new_zeros(core.shape[0], rank[0], rank[1])
    padded[:, : core.shape[1], : core.shape[2]] = core
    return Tucker2(padded, factors[0], factors[1])


def lora_to_lotr(
    lora: LoRASource,
    *,
    rank: int | tuple[int, int] | Mapping[str, tuple[int, int]] | None = None,
    energy: float | None = None,
    n_iter: int = 0,
    groups: str | dict[str, list[str]] | Sequence[Group] = "by_name",
    weighting: OutputWeighting | None = None,
    pad: bool = False,
    progress: Callable[[Iterable[Any], str, int], Iterable[Any]] | None = None,
    dtype: torch.dtype = torch.float32,
) -> LoRAConversion:
    """Convert a LoRA to a LoTR adapter: each group's stack of ``s_l B_l A_l`` to one Tucker-2.

    Parameters
    ----------
    lora : LoRASource
        The LoRA factors by module path (:class:`LoRALayers`, or a PEFT folder's ``PeftLoRA``).
    rank : int, (r_out, r_in) or dict of group to (r_out, r_in), optional
        The Tucker ranks, for every group or by group name. A group never gets more than its
        exact rank (at most the sum of its LoRA ranks, and :func:`tensorlotr.core.max_rank`):
        it is kept there with a note, or padded back with ``pad``. ``None`` keeps the exact
        rank, so the conversion is lossless.
    energy : float, optional
        Per group and mode, the smallest rank keeping this fraction of the squared singular
        values; ``rank`` then caps it.
    n_iter : int
        HOOI sweeps after the HOSVD.
    groups : "by_name", "shared", dict or list of Group
        As :class:`tensorlotr.LoTRConfig`'s ``groups``, or the groups themselves (a model's plan).
    weighting : OutputWeighting, optional
        The calibration of the output-aware route; each group then reports its output errors.
    pad : bool
        Where the exact rank is below ``rank``, add random orthonormal factor columns with zero
        core entries (drawn from one generator seeded 0), so that the adapter has the requested
        rank and computes the same update: every direction can train.
    progress : callable, optional
        ``progress(groups, "converting", len(groups))`` wraps the loop over the groups (tqdm's way).
    dtype : torch.dtype
        The dtype the factors and cores are stored in (the decomposition runs in float64 for
        float64 factors, else float32).

    Returns
    -------
    LoRAConversion
        The adapter (factors and cores in ``dtype``, every scale in the cores, as
        :class:`AdapterBuilder` builds it), per group the :class:`GroupConversion`, and notes.

    Examples
    --------
    Two layers of a LoRA of rank 2 on (d_out, d_in) = (6, 5): the exact rank of the stack is 4.

    >>> import torch
    >>> layers = LoRALayers({f"l.{i}.q": LoRAFactors(torch.randn(6, 2), torch.randn(2, 5), 2.0) for i in range(2)})
    >>> exact = lora_to_lotr(layers)
    >>> [(g.group, g.rank, g.relative_error < 1e-6) for g in exact.groups]
    [('q', (4, 4), True)]
    >>> sorted(exact.files.tensors)
    ['cores.l.0.q', 'cores.l.1.q', 'factors.q.in_factor', 'factors.q.out_factor']
    >>> lora_to_lotr(layers, rank=2).groups[0].relative_error > 0  # truncated
    True
    >>> lora_to_lotr(layers, rank=5, pad=True).groups[0].rank  # padded above the exact rank
    (5, 5)
    """
    config_groups: str | dict[str, list[str]]
    if isinstance(groups, (str, dict)):
        config_groups = groups
        plan = group_modules({name: tuple(m.shape) for name, m in lora.modules.items()}, groups)
    else:  # the groups themselves: the config names their modules
        plan = list(groups)
        config_groups = {g.name: list(g.modules) for g in plan}
    requested = None if isinstance(rank, Mapping) else normalize_rank(rank)
    generator = torch.Generator().manual_seed(0)
    builder = AdapterBuilder()
    rows: list[GroupConversion] = []
    notes: list[str] = []
    for group in progress(plan, "converting", len(plan)) if progress is not None else plan:
        start = time.perf_counter()
        names = list(group.modules)
        wanted = normalize_rank(rank[group.name]) if isinstance(rank, Mapping) else requested
        bs, as_, scales = lora.load(names)
        bs, as_ = [_compute_dtype(b) for b in bs], [_compute_dtype(a) for a in as_]
        # the stack has rank at most sum_l r_l in both modes: never beyond it
        total = sum(lora.modules[n].rank for n in names)
        bound = tuple(min(m, total) for m in max_rank(len(names), group.shape))
        kept = None if wanted is None else (min(wanted[0], bound[0]), min(wanted[1], bound[1]))
        z = weighting.factors(names) if weighting is not None else None
        if weighting is None or z is None or not weighting.fit:
            tucker = tucker2_lowrank(bs, as_, kept, scale=scales, energy=energy, n_iter=n_iter)
        else:  # output-aware: float64, as the calibration statistics
            tucker = tucker2_weighted(
                [b.double() for b in bs], [a.double() for a in as_], z, kept, scale=scales, energy=energy,
                damping=weighting.damping, n_iter=weighting.n_iter,
            )  # fmt: skip
        norm_sq = lowrank_norm_sq(bs, as_, scales)
        error_sq = relative_error_lowrank(tucker, bs, as_, scales) ** 2 * norm_sq
        row = GroupConversion(
            group=group.name,
            modules=names,
            shape=tuple(group.shape),
            tucker=tucker,
            norm_sq=norm_sq,
            error_sq=error_sq if math.isfinite(error_sq) else 0.0,
            lora_rank=max(lora.modules[n].rank for n in names),
            lora_params=sum(lora.modules[n].n_params for n in names),
            seconds=0.0,
        )
        if z is not None:  # exact, in float64, never forming a d_out x d_in matrix
            tucker64 = Tucker2(*(torch.as_tensor(x).double() for x in tucker))
            res, ref = weighted_residuals_lowrank(
                tucker64, [b.double() for b in bs], [a.double() for a in as_], list(z), list(scales)
            )
            row.output_sq, row.output_ref_sq = float(res.sum()), float(ref.sum())
        if pad and wanted is not None:
            row.tucker = _padded(tucker, wanted, generator)
        builder.add_group(group.name, names, row.tucker, fan_in_fan_out=lora.fan_in_fan_out, dtype=dtype)
        row.seconds = time.perf_counter() - start
        rows.append(row)
        note = clipped_rank_note(group.name, None if energy else wanted, row.rank)
        if note:
            notes.append(note)
    modules_to_save = builder.add_saved(lora.load_modules_to_save())
    base = {"name_or_path": lora.config.get("base_model_name_or_path"), "task_type": lora.config.get("task_type")}
    files = builder.build(lora.config.get("target_modules"), config_groups, modules_to_save, base)
    return LoRAConversion(files, rows, modules_to_save, notes)
