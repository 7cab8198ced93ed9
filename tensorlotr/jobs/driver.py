"""The driver shared by ``convert_lora`` and ``decompose``: a plan of groups in, an adapter and a report out.

The jobs differ only in how they produce each group's :class:`tensorlotr.Tucker2`; they hand
the driver a function from a :class:`~tensorlotr.adapter.Group` to a :class:`GroupOutcome`.
The driver runs the plan with progress, stores every group, builds the adapter, writes it
atomically and reports per group and in total.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..adapter import AdapterBuilder, Group, LoTRAdapterFiles
from ..core import Tucker2, clipped_rank_note
from ..progress import Progress, no_progress
from ..report import Result, format_table, to_json


@dataclass
class GroupOutcome:
    """What a job computed for one group.

    ``norm_sq`` is ``sum_l ||dW_l||_F^2`` and ``error_sq`` is ``sum_l ||dW_l - U G_l V^T||_F^2``;
    ``details`` are the job's own report columns (LoRA params, route, …).

    Examples
    --------
    >>> import numpy as np
    >>> from tensorlotr.core import tucker2
    >>> stack = np.random.default_rng(0).standard_normal((2, 6, 5))  # (L, d_out, d_in)
    >>> outcome = GroupOutcome(tucker2(stack), norm_sq=float((stack**2).sum()), error_sq=0.0)
    >>> outcome.tucker.rank  # the exact rank: U (6, 6), V (5, 5)
    (6, 5)
    """

    tucker: Tucker2
    norm_sq: float
    error_sq: float
    fan_in_fan_out: bool = False
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class GroupReport:
    """One group of an adapter a job built. Job-specific columns are ``None`` where they do not apply.

    ``shape`` is each layer's ``(d_out, d_in)`` and ``rank`` ``(r_out, r_in)``.

    Examples
    --------
    >>> row = GroupReport(
    ...     group="query", layers=6, shape=(384, 384), rank=(8, 8), lotr_params=6528, relative_error=0.0, seconds=0.1
    ... )
    >>> row.lotr_params == 8 * 384 + 8 * 384 + 6 * 8 * 8
    True
    """

    group: str
    layers: int
    shape: tuple[int, int]
    rank: tuple[int, int]
    lotr_params: int
    relative_error: float
    seconds: float
    lora_rank: tuple[int, int] | None = None
    lora_params: int | None = None
    energy_kept: float | None = None
    route: str | None = None
    passes: int | None = None
    output_error: float | None = None  # relative calibrated output error (output-aware compression)
    healed_error: float | None = None  # relative weight error after the heal
    healed_output_error: float | None = None  # relative calibrated output error after the heal


_COLUMNS = {
    "group": "group",
    "layers": "layers",
    "shape": "shape",
    "lora_rank": "LoRA rank",
    "rank": "LoTR rank",
    "lora_params": "LoRA params",
    "lotr_params": "LoTR params",
    "relative_error": "rel. error",
    "output_error": "output error",
    "healed_error": "healed rel. error",
    "healed_output_error": "healed output error",
    "energy_kept": "energy kept",
    "route": "route",
}


@dataclass(kw_only=True)
class AdapterReport(Result):
    """What a job that builds an adapter (convert, decompose) wrote, and what it cost.

    Examples
    --------
    >>> row = GroupReport(
    ...     group="query", layers=6, shape=(384, 384), rank=(8, 8), lotr_params=6528, relative_error=0.01,
    ...     seconds=0.1, lora_rank=(8, 8), lora_params=36864,
    ... )
    >>> report = AdapterReport(source="my-lora", output=None, groups=[row], relative_error=0.01)
    >>> round(report.totals()["compression"], 2)
    5.65
    >>> print(report.summary())
    36,864 LoRA params -> 6,528 LoTR params (compression 5.6x), relative error 1.000e-02, 0.00 s
    """

    source: str
    output: str | None
    groups: list[GroupReport]
    modules_to_save: list[str] = field(default_factory=list)
    relative_error: float = 0.0  # over all groups: sqrt(sum_g err_g^2 / sum_g ||dW_g||^2)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    output_error: float | None = None  # over all groups, with calibration: sqrt(sum res^2 / sum ||dW Z||^2)
    calibration: dict[str, Any] | None = None  # samples, tokens and seconds of the calibration pass
    heal: dict[str, Any] | None = None  # tensorlotr.heal.HealReport.to_dict()
    retention: dict[str, Any] | None = None  # held-out retention (tensorlotr.nn.evaluate.Retention.to_dict())
    retention_tries: list[dict[str, Any]] = field(default_factory=list)  # min_retention: each rank tried
    #: the adapter built, in memory (``LoTRModel.from_adapter_files`` attaches it); not in ``to_dict()``
    adapter: LoTRAdapterFiles | None = field(default=None, repr=False, compare=False, metadata={"json": False})

    @property
    def lotr_params(self) -> int:
        return sum(g.lotr_params for g in self.groups)

    @property
    def lora_params(self) -> int:
        return sum(g.lora_params or 0 for g in self.groups)

    def totals(self) -> dict[str, Any]:
        totals: dict[str, Any] = {"lotr_params": self.lotr_params, "relative_error": self.relative_error}
        if self.output_error is not None:
            totals["output_error"] = self.output_error
        if self.lora_params:
            totals["lora_params"] = self.lora_params
            totals["compression"] = self.lora_params / max(self.lotr_params, 1)
        return totals

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "totals": self.totals()}

    def table(self) -> str:
        """Per group and in total, as an aligned text table."""
        used = [key for key in _COLUMNS if any(getattr(g, key) is not None for g in self.groups)]
        rows = [{_COLUMNS[k]: getattr(g, k) for k in used} for g in self.groups]
        total: dict[str, Any] = {_COLUMNS[k]: "" for k in used}
        total.update(group="total", layers=sum(g.layers for g in self.groups))
        total[_COLUMNS["lotr_params"]] = self.lotr_params
        total[_COLUMNS["relative_error"]] = self.relative_error
        if "lora_params" in used:
            total[_COLUMNS["lora_params"]] = self.lora_params
        return format_table([*rows, total])

    def summary(self) -> str:
        """One line: parameters, error, time, output."""
        text = f"{self.lotr_params:,} LoTR params"
        if self.lora_params:
            ratio = self.lora_params / max(self.lotr_params, 1)
            text = f"{self.lora_params:,} LoRA params -> {text} (compression {ratio:.1f}x)"
        text += f", relative error {self.relative_error:.3e}"
        if self.output_error is not None:
            text += f", calibrated output error {self.output_error:.3e}"
        text += f", {self.seconds:.2f} s"
        return text + (f"; wrote {self.output}" if self.output else "")

    def text(self) -> str:
        return "\n".join([self.table(), *self.notes, self.summary()])


@dataclass
class PlanResult:
    """The groups of a plan, decomposed: the builder holding them, their reports, and totals.

    :func:`run_plan` returns one (see its example).

    Examples
    --------
    >>> PlanResult(AdapterBuilder(), [], norm_sq=4.0, error_sq=1.0).relative_error
    0.5
    """

    builder: AdapterBuilder
    groups: list[GroupReport]
    norm_sq: float  # sum over groups of ||dW_g||^2
    error_sq: float  # sum over groups of ||dW_g - U G V^T||^2
    notes: list[str] = field(default_factory=list)

    @property
    def relative_error(self) -> float:
        """Over all groups; 0 when every update is zero."""
        return math.sqrt(self.error_sq / self.norm_sq) if self.norm_sq > 0 else 0.0


def run_plan(
    plan: Sequence[Group],
    decompose_group: Callable[[Group], GroupOutcome],
    *,
    progress: Progress | None = None,
    desc: str = "groups",
    rank: tuple[int, int] | None = None,
) -> PlanResult:
    """Decompose every group of ``plan`` with ``decompose_group`` and store it.

    ``rank`` is the rank the user asked for: a group that ends below it (its exact rank is
    smaller) gets a note in the report.

    Examples
    --------
    A plan of one group, two layers of (d_out, d_in) = (6, 5), decomposed at rank (3, 2):

    >>> import numpy as np
    >>> from tensorlotr.adapter import Group
    >>> from tensorlotr.core import relative_error, tucker2
    >>> stacks = {"query": np.random.default_rng(0).standard_normal((2, 6, 5))}
    >>> plan = [Group("query", ("layer.0.query", "layer.1.query"), (6, 5))]
    >>> def decompose_group(group):
    ...     stack = stacks[group.name]
    ...     tucker = tucker2(stack, rank=(3, 2))
    ...     norm_sq = float((stack**2).sum())
    ...     return GroupOutcome(tucker, norm_sq, relative_error(tucker, stack) ** 2 * norm_sq)
    >>> done = run_plan(plan, decompose_group)
    >>> done.groups[0].rank, done.groups[0].lotr_params  # U (6, 3), V (5, 2), two cores (3, 2)
    ((3, 2), 40)
    >>> 0 < done.relative_error < 1
    True
    """
    progress = progress or no_progress
    builder = AdapterBuilder()
    reports: list[GroupReport] = []
    err_sq = total_sq = 0.0
    for group in progress(plan, desc, len(plan)):
        start = time.perf_counter()
        outcome = decompose_group(group)
        builder.add_group(group.name, list(group.modules), outcome.tucker, fan_in_fan_out=outcome.fan_in_fan_out)
        error_sq = outcome.error_sq if math.isfinite(outcome.error_sq) else 0.0
        err_sq += error_sq
        total_sq += outcome.norm_sq
        reports.append(
            GroupReport(
                group=group.name,
                layers=len(group.modules),
                shape=group.shape,
                rank=outcome.tucker.rank,
                lotr_params=outcome.tucker.n_params,
                relative_error=math.sqrt(error_sq / outcome.norm_sq) if outcome.norm_sq > 0 else 0.0,
                seconds=time.perf_counter() - start,
                **outcome.details,
            )
        )
    notes = [note for g in reports if (note := clipped_rank_note(g.group, rank, g.rank))]
    return PlanResult(builder, reports, total_sq, err_sq, notes)


def save_adapter(
    files: LoTRAdapterFiles,
    out_dir: str | os.PathLike[str] | None,
    *,
    force: bool,
    documents: dict[str, Any] | None = None,
) -> None:
    """Write ``files`` as a new adapter folder ``out_dir``, atomically (nothing when ``None``).

    ``documents`` are more JSON files to write into the folder, by file name (the
    compression report that ``inspect`` shows, say).

    Examples
    --------
    >>> import numpy as np
    >>> from tensorlotr.adapter import AdapterBuilder
    >>> from tensorlotr.core import tucker2
    >>> from tensorlotr.io import read_adapter
    >>> tucker = tucker2(np.random.default_rng(0).standard_normal((2, 6, 5)), rank=(3, 2))
    >>> builder = AdapterBuilder()
    >>> builder.add_group("query", ["layer.0.query", "layer.1.query"], tucker, fan_in_fan_out=False)
    >>> save_adapter(builder.build(["query"], "by_name", [], {}), "my-adapter", force=False)
    >>> read_adapter("my-adapter").groups["query"].rank
    (3, 2)
    """
    if out_dir is None:
        return
    from ..io import atomic_dir, write_adapter

    with atomic_dir(out_dir, force=force) as tmp:
        write_adapter(tmp, files)
        for name, document in (documents or {}).items():
            (tmp / name).write_text(to_json(document) + "\n", encoding="utf-8")
