"""The LoRA zoo: many adapters of one base compressed into one shared Tucker-2 basis per group.

Across a zoo, a group's updates form a 4-way tensor (adapter, layer, d_out, d_in). Each group
gets one ``U`` (d_out, r_out) and one ``V`` (d_in, r_in) shared by every adapter and layer, and
each adapter owns an ``r_out x r_in`` core per layer. The adapter and layer modes are never
compressed, so the decomposition is :func:`tensorlotr.tucker2_lowrank` of the list of every
adapter's LoRA factors: factored throughout, exact at full rank, with optional HOOI sweeps.
A group that an adapter lacks has no cores for it and costs nothing.

With calibration statistics the basis minimises the calibrated output error instead
(:func:`tensorlotr.core.tucker2_weighted`; every adapter's layer l sees the base model's
inputs of layer l). Fairness: by default each adapter's term is divided by its own (output)
energy, so the basis minimises the sum of the adapters' *relative* errors, and a small adapter
is not sacrificed to a large one; ``min_retention`` then guarantees each adapter a share of
its energy in every group, reweighting the adapters that fall short and, if that is not
enough, raising the group's rank (see ``docs/calibration.md`` for the measurements behind
this choice).
"""

from __future__ import annotations

import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..adapter import group_modules, module_order
from ..adapter.layout import (
    IN_FACTOR,
    OUT_FACTOR,
    GroupLayout,
    ZooAdapter,
    ZooFiles,
    factor_key,
    zoo_core_key,
    zoo_saved_key,
)
from ..core import (
    Tucker2,
    clipped_rank_note,
    lowrank_norm_sq,
    normalize_rank,
    relative_error_lowrank,
    tucker2_lowrank,
    tucker2_weighted,
)
from ..files.atomic import atomic_dir, check_output
from ..io import is_lotr_dir, read_adapter
from ..io.peft_lora import CONFIG_NAME as PEFT_CONFIG_NAME
from ..io.peft_lora import PeftLoRA
from ..io.zoo_format import is_zoo_dir, read_zoo, write_zoo
from ..progress import Progress, no_progress
from ..report import Result, format_table, to_json
from .calibration import (
    REPORT_NAME,
    Calibration,
    CalibrationStats,
    ErrorSums,
    add_report_columns,
    as_calibration,
    compression_document,
    error_sums,
)

_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


class _Source:
    """One adapter to put in a zoo, as LoRA factors: a PEFT LoRA folder or a LoTR adapter folder.

    ``modules`` maps module path to ``(d_out, d_in)``; :meth:`load` gives ``B_l`` (d_out, r_l),
    ``A_l`` (r_l, d_in) and ``s_l`` for a list of modules.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = str(path)
        folder = Path(path)
        if is_zoo_dir(folder):
            raise ValueError(f"{folder} is a zoo, not an adapter; export one of its adapters first (--adapter)")
        if (folder / PEFT_CONFIG_NAME).is_file():
            self.lora: PeftLoRA | None = PeftLoRA(folder)
            self.modules = {m.name: m.shape for m in self.lora.modules.values()}
            self.n_params = self.lora.n_params
            self.fan_in_fan_out = self.lora.fan_in_fan_out
            self.base = self.lora.config.get("base_model_name_or_path")
            self._lotr = None
        elif is_lotr_dir(folder):
            self.lora = None
            self._lotr = read_adapter(folder)
            self.modules = {m: tuple(g.shape) for g in self._lotr.groups.values() for m in g.modules}
            self.n_params = sum(g.n_params for g in self._lotr.groups.values())
            self.fan_in_fan_out = any(g.fan_in_fan_out for g in self._lotr.groups.values())
            self.base = self._lotr.base_model.get("name_or_path")
        else:
            raise FileNotFoundError(f"{folder} holds neither a PEFT LoRA ({PEFT_CONFIG_NAME}) nor a LoTR adapter")

    def load(self, names: list[str]) -> tuple[list[torch.Tensor], list[torch.Tensor], list[float]]:
        if self.lora is not None:
            bs, as_, scales = self.lora.load(names)
            # computed in float32 (as convert_lora does) unless stored in float64; errors are summed in float64
            work = torch.float64 if bs[0].dtype == torch.float64 else torch.float32
            return [b.to(work) for b in bs], [a.to(work) for a in as_], scales
        assert self._lotr is not None
        group_of = {m: (name, g) for name, g in self._lotr.groups.items() for m in g.modules}
        bs, as_ = [], []
        for module in names:  # dW = U (s G) V^T: B = U (d_out, r_out), A = s G V^T (r_out, d_in)
            group, layout = group_of[module]
            u = self._lotr.factor(group, OUT_FACTOR).double()
            v = self._lotr.factor(group, IN_FACTOR).double()
            bs.append(u)
            as_.append(layout.scale * self._lotr.core(module).double() @ v.T)
        return bs, as_, [1.0] * len(names)

    def load_modules_to_save(self) -> dict[str, torch.Tensor]:
        if self.lora is not None:
            return self.lora.load_modules_to_save()
        assert self._lotr is not None
        return self._lotr.modules_to_save


@dataclass
class ZooAdapterReport:
    """One adapter of a zoo: its modules, its separate size, what it adds to the zoo, and its errors.

    ``relative_error`` is its weight error; with calibration ``output_error`` is its calibrated
    output error (both relative to its own size), and after a heal ``healed_error`` and
    ``healed_output_error`` are the same for the healed cores, and ``heal`` is its heal report.
    """

    adapter: str
    source: str
    modules: int
    separate_params: int
    core_params: int
    relative_error: float
    output_error: float | None = None
    healed_error: float | None = None
    healed_output_error: float | None = None
    heal: dict[str, Any] | None = None


@dataclass(kw_only=True)
class ZooReport(Result):
    """What :func:`compress_zoo` or :func:`add_to_zoo` built: per adapter and per group, and the storage."""

    output: str | None
    adapters: list[ZooAdapterReport]
    groups: list[dict[str, Any]]
    stored_params: int
    separate_params: int
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    adapter_groups: list[dict[str, Any]] = field(default_factory=list)  # errors per adapter and group
    calibration: dict[str, Any] | None = None
    zoo: ZooFiles | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        data = {k: v for k, v in super().to_dict().items() if k != "zoo"}
        data["totals"] = {
            "stored_params": self.stored_params,
            "separate_params": self.separate_params,
            "compression": self.separate_params / max(self.stored_params, 1),
        }
        return data

    def text(self) -> str:
        rows = []
        for a in self.adapters:
            row = {
                "adapter": a.adapter,
                "modules": a.modules,
                "separate params": a.separate_params,
                "core params": a.core_params,
                "rel. error": a.relative_error,
            }
            for key, column in _ERROR_COLUMNS.items():
                if any(getattr(b, key) is not None for b in self.adapters):
                    row[column] = getattr(a, key) if getattr(a, key) is not None else ""
            if a.heal is not None:
                row["healed end-to-end"] = f"{a.heal['error_before']:.3f} -> {a.heal['error_after']:.3f}"
            rows.append(row)
        ratio = self.separate_params / max(self.stored_params, 1)
        lines = [
            format_table(rows),
            format_table(self.groups),
            *self.notes,
            f"{len(self.adapters)} adapters: {self.separate_params:,} params stored separately -> "
            f"{self.stored_params:,} in the zoo ({ratio:.1f}x smaller), {self.seconds:.2f} s"
            + (f"; wrote {self.output}" if self.output else ""),
        ]
        return "\n".join(lines)


_ERROR_COLUMNS = {
    "output_error": "output error",
    "healed_error": "healed rel. error",
    "healed_output_error": "healed output error",
}


def _report(
    zoo: ZooFiles,
    output: str | None,
    seconds: float,
    separate: dict[str, int],
    notes: list[str],
    errors: dict[tuple[str, str], dict[str, ErrorSums]] | None = None,
) -> ZooReport:
    """The report of ``zoo``; ``errors[(adapter, group)]`` holds ``"compressed"`` and ``"healed"`` sums."""
    errors = errors or {}

    def total(name: str, stage: str, by: int = 0) -> ErrorSums | None:
        found = [e[stage] for key, e in errors.items() if key[by] == name and stage in e]
        return sum(found, ErrorSums()) if found else None

    adapters = []
    for name, entry in zoo.adapters.items():
        compressed, healed = total(name, "compressed"), total(name, "healed")
        adapters.append(
            ZooAdapterReport(
                adapter=name,
                source=entry.source,
                modules=len(entry.modules),
                separate_params=separate.get(name, entry.lora_params),
                core_params=zoo.core_params(name),
                relative_error=entry.relative_error,
                output_error=compressed.output_error if compressed is not None else None,
                healed_error=healed.weight_error if healed is not None else None,
                healed_output_error=healed.output_error if healed is not None else None,
            )
        )
    groups = []
    for name, g in zoo.groups.items():
        row: dict[str, Any] = {
            "group": name,
            "shape": list(g.shape),
            "rank": list(g.rank),
            "adapters": sum(name in a.groups for a in zoo.adapters.values()),
            "layers": len(g.modules),
        }
        compressed = total(name, "compressed", by=1)
        if compressed is not None:
            row["relative_error"] = compressed.weight_error
            if compressed.output_error is not None:
                row["output_error"] = compressed.output_error
        groups.append(row)
    per_pair = [
        {
            "adapter": adapter,
            "group": group,
            **{f"{stage}_{k}": v for stage, sums in e.items() for k, v in _figures(sums).items()},
        }
        for (adapter, group), e in errors.items()
    ]
    return ZooReport(
        output=output,
        adapters=adapters,
        groups=groups,
        stored_params=zoo.n_params,
        separate_params=sum(a.separate_params for a in adapters),
        seconds=seconds,
        notes=notes,
        adapter_groups=per_pair,
        zoo=zoo,
    )


def _figures(sums: ErrorSums) -> dict[str, float]:
    """``relative_error`` and, with calibration, ``output_error`` of some layers."""
    out = {"relative_error": sums.weight_error}
    if sums.output_error is not None:
        out["output_error"] = sums.output_error
    return out


def _names(paths: list[str], names: list[str] | None) -> list[str]:
    chosen = list(names) if names is not None else [Path(p).resolve().name for p in paths]
    if len(chosen) != len(paths):
        raise ValueError(f"{len(chosen)} names for {len(paths)} sources")
    for name in chosen:
        if not _NAME.match(name):
            raise ValueError(f"adapter name {name!r} must be letters, digits, '_' or '-'")
    duplicates = sorted({n for n in chosen if chosen.count(n) > 1})
    if duplicates:
        raise ValueError(f"adapter names must be unique; repeated: {duplicates} (give --names)")
    return chosen


def _check_same_base(sources: dict[str, _Source]) -> dict[str, tuple[int, int]]:
    """Every module's shape across the sources; errors on other bases or mismatched shapes."""
    bases = {name: s.base for name, s in sources.items() if s.base}
    if len(set(bases.values())) > 1:
        listing = ", ".join(f"{n}: {b}" for n, b in bases.items())
        raise ValueError(f"the sources are adapters of different base models ({listing})")
    roots = {name: {m.split(".", 1)[0] for m in s.modules} for name, s in sources.items()}
    first = next(iter(roots))
    for name, root in roots.items():
        if not root & roots[first]:
            raise ValueError(
                f"adapters {first!r} and {name!r} share no module path root ({sorted(roots[first])} vs {sorted(root)}):"
                " they are adapters of different base models"
            )
    shapes: dict[str, tuple[int, int]] = {}
    owner: dict[str, str] = {}
    for name, source in sources.items():
        for module, shape in source.modules.items():
            if module in shapes and shapes[module] != shape:
                raise ValueError(
                    f"module {module!r} is {shapes[module][0]}x{shapes[module][1]} in {owner[module]!r} but "
                    f"{shape[0]}x{shape[1]} in {name!r}: these adapters are not for the same base"
                )
            shapes.setdefault(module, shape)
            owner.setdefault(module, name)
    return shapes


def compress_zoo(
    sources: list[str | os.PathLike],
    out_dir: str | os.PathLike | None = None,
    *,
    names: list[str] | None = None,
    rank: int | tuple[int, int] | None = None,
    energy: float | None = None,
    n_iter: int = 0,
    groups: str | dict[str, list[str]] = "by_name",
    force: bool = False,
    progress: Progress | None = None,
    calibration: Calibration | CalibrationStats | None = None,
    fairness: str = "relative",
    min_retention: float | None = None,
) -> ZooReport:
    """Compress adapters of one base into one shared Tucker-2 basis per group.

    Parameters
    ----------
    sources : list of paths
        PEFT LoRA folders or LoTR adapter folders, for the same base model. They may differ
        in rank, alpha, rslora, rank patterns and target modules.
    out_dir : path, optional
        The zoo folder to write, atomically (an existing one needs ``force``).
    names : list of str, optional
        One name per source (default: the folder names).
    rank, energy, n_iter, groups
        As in :func:`tensorlotr.convert_lora`, for the stack of every adapter's layers in a
        group: ``U`` (d_out, r_out) and ``V`` (d_in, r_in) are shared by all of them.
        ``rank=None`` keeps the exact rank (lossless).
    calibration : Calibration or CalibrationStats, optional
        Minimise the calibrated output error instead of the weight error (as in
        :func:`tensorlotr.convert_lora`); with ``heal_steps`` each adapter's cores are then
        healed against its own LoRA (the shared factors stay as they are).
    fairness : "relative" or "none"
        ``"relative"``: each adapter's term is divided by its own energy (its updates' squared
        norm, or with calibration their output energy), so every adapter counts by its relative
        error; ``"none"``: the plain sum, where large adapters dominate.
    min_retention : float in (0, 1), optional
        Guarantee every adapter at least this share of its energy in every group
        (``1 - relative error^2``, of the output error with calibration): adapters short of it
        are weighted up, and if reweighting does not get there the group's rank is raised
        (noted in the report). ``None``: no guarantee.

    Returns
    -------
    ZooReport
        Per adapter: its separate size, the cores it adds, its exact relative error (and,
        with calibration, its output error before and after the heal); per group: shape,
        rank and how many adapters use it; per adapter and group the same errors
        (``adapter_groups``); storage against the separate adapters. ``report.zoo`` holds
        the zoo in memory.
    """
    start = time.perf_counter()
    paths = [str(p) for p in sources]
    if not paths:
        raise ValueError("compress_zoo needs at least one source")
    if fairness not in _FAIRNESS:
        raise ValueError(f"fairness must be one of {_FAIRNESS}, got {fairness!r}")
    if min_retention is not None and not 0.0 < float(min_retention) < 1.0:
        raise ValueError(f"min_retention must be in (0, 1), got {min_retention!r}")
    cal = as_calibration(calibration)
    if cal is not None and cal.heal_factors:
        raise ValueError("the adapters of a zoo share their factors: healing trains each adapter's cores only")
    check_output(out_dir, force, inputs=paths)
    requested = normalize_rank(rank)
    chosen = _names(paths, names)
    loaded = {name: _Source(path) for name, path in zip(chosen, paths, strict=True)}
    shapes = _check_same_base(loaded)
    progress = progress or no_progress
    stats = cal.statistics(sorted(shapes, key=module_order), progress) if cal is not None else None
    objective = _Objective(stats, cal, fairness, min_retention)
    zoo, errors, notes = _compress(loaded, shapes, requested, energy, n_iter, groups, progress, objective)
    notes = _clipped_notes(zoo, requested, energy) + notes
    heals: dict[str, Any] = {}
    if cal is not None and cal.heal_steps:
        heals = _heal_zoo(zoo, loaded, cal, errors, progress)
    separate = {name: s.n_params for name, s in loaded.items()}
    report = _report(zoo, str(out_dir) if out_dir is not None else None, 0.0, separate, notes, errors)
    for entry in report.adapters:
        entry.heal = heals.get(entry.adapter)
    report.calibration = stats.summary() if stats is not None else None
    if out_dir is not None:
        with atomic_dir(out_dir, force=force) as tmp:
            write_zoo(tmp, zoo)
            if cal is not None:
                (tmp / REPORT_NAME).write_text(to_json(compression_document(report)) + "\n", encoding="utf-8")
    report.seconds = time.perf_counter() - start
    return report


_FAIRNESS = ("relative", "none")


@dataclass
class _Objective:
    """How each group's basis is fitted: calibration statistics, fairness and the retention guarantee."""

    stats: CalibrationStats | None = None
    calibration: Calibration | None = None
    fairness: str = "none"
    min_retention: float | None = None
    max_rounds: int = 6  # reweighting rounds before the rank is raised

    def fit(
        self,
        layers: tuple[list[torch.Tensor], list[torch.Tensor], list[float]],
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


def _compress(
    sources: dict[str, Any],
    shapes: dict[str, tuple[int, int]],
    rank: tuple[int, int] | None,
    energy: float | None,
    n_iter: int,
    groups: str | dict[str, list[str]],
    progress: Progress,
    objective: _Objective | None = None,
) -> tuple[ZooFiles, dict[tuple[str, str], dict[str, ErrorSums]], list[str]]:
    """The zoo of ``sources``; the error sums per (adapter, group) after compression; notes on raised ranks."""
    objective = objective or _Objective()
    layouts: dict[str, GroupLayout] = {}
    tensors: dict[str, torch.Tensor] = {}
    members = {name: ZooAdapter(s.path, {}, s.n_params) for name, s in sources.items()}
    errors: dict[tuple[str, str], dict[str, ErrorSums]] = {}
    notes: list[str] = []
    ordered = dict(sorted(shapes.items(), key=lambda item: module_order(item[0])))
    plan = group_modules(ordered, groups)
    for group in progress(plan, "compressing", len(plan)):
        parts = []  # (adapter, its modules in this group, B list, A list, scales)
        for name, source in sources.items():
            modules = [m for m in group.modules if m in source.modules]
            if modules:
                parts.append((name, modules, *source.load(modules)))
        bs = [b for part in parts for b in part[2]]
        as_ = [a for part in parts for a in part[3]]
        scales = [s for part in parts for s in part[4]]
        factor_of = {m: objective.stats.factor(m) for m in group.modules} if objective.stats is not None else None
        factors = [factor_of[m] for part in parts for m in part[1]] if factor_of is not None else None
        (d_out, d_in), total = group.shape, sum(int(b.shape[1]) for b in bs)
        exact = (min(d_out, len(bs) * d_in, total), min(d_in, len(bs) * d_out, total))
        clipped = None if rank is None else (min(rank[0], exact[0]), min(rank[1], exact[1]))
        tucker, sums = _fit_group(
            objective, parts, factor_of, (bs, as_, scales), factors, clipped, exact, energy, n_iter
        )
        if objective.min_retention is not None and energy is None and clipped is not None and tucker.rank != clipped:
            notes.append(
                f"group {group.name}: rank raised from {clipped[0]}x{clipped[1]} to {tucker.rank[0]}x{tucker.rank[1]} "
                f"so that every adapter keeps {objective.min_retention:.0%} of its energy"
            )
        u, v = torch.as_tensor(tucker.out_factor), torch.as_tensor(tucker.in_factor)
        core = torch.as_tensor(tucker.core)
        tensors[factor_key(group.name, OUT_FACTOR)] = u.float().contiguous()
        tensors[factor_key(group.name, IN_FACTOR)] = v.float().contiguous()
        offset = 0
        for name, modules, *_ in parts:
            cores = core[offset : offset + len(modules)]
            offset += len(modules)
            for module, c in zip(modules, cores, strict=True):
                tensors[zoo_core_key(name, module)] = c.float().contiguous()
            members[name].groups[group.name] = modules
            errors[(name, group.name)] = {"compressed": sums[name]}
        fan_in_fan_out = any(sources[name].fan_in_fan_out for name, *_ in parts)
        layouts[group.name] = GroupLayout(list(group.modules), group.shape, tucker.rank, 1.0, fan_in_fan_out)
    for name, source in sources.items():
        saved = source.load_modules_to_save()
        for key, tensor in saved.items():
            tensors[zoo_saved_key(name, key)] = tensor
        members[name].modules_to_save = sorted({key.rsplit(".", 1)[0] for key in saved})
        mine = [e["compressed"] for (adapter, _), e in errors.items() if adapter == name]
        members[name].relative_error = sum(mine, ErrorSums()).weight_error
    bases = {s.base for s in sources.values() if s.base}
    return ZooFiles(layouts, members, tensors, {"name_or_path": bases.pop() if bases else None}), errors, notes


def _fit_group(
    objective: _Objective,
    parts: list[tuple[Any, ...]],
    factor_of: dict[str, torch.Tensor] | None,
    layers: tuple[list[torch.Tensor], list[torch.Tensor], list[float]],
    factors: list[torch.Tensor] | None,
    rank: tuple[int, int] | None,
    exact: tuple[int, int],
    energy: float | None,
    n_iter: int,
) -> tuple[Tucker2, dict[str, ErrorSums]]:
    """One group's Tucker-2 and each adapter's error sums, with the fairness weights and the retention guarantee."""

    def per_adapter(tucker: Tucker2) -> dict[str, ErrorSums]:
        out, offset = {}, 0
        core = torch.as_tensor(tucker.core)
        for name, modules, b, a, s in parts:
            piece = Tucker2(core[offset : offset + len(modules)], tucker.out_factor, tucker.in_factor)
            out[name] = error_sums(piece, b, a, s, [factor_of[m] for m in modules] if factor_of else None)
            offset += len(modules)
        return out

    def share_lost(sums: ErrorSums) -> float:  # 1 - retention: the relative (output) error squared
        error = sums.output_error if sums.output_error is not None else sums.weight_error
        return error**2

    adapter_weight = {name: 1.0 for name, *_ in parts}
    if objective.fairness == "relative":
        for name, modules, b, a, s in parts:
            sums = error_sums(
                _empty(b[0], a[0], len(modules)), b, a, s, [factor_of[m] for m in modules] if factor_of else None
            )
            energy_a = sums.output_ref if sums.output_ref is not None else sums.weight_ref
            adapter_weight[name] = 1.0 / energy_a if energy_a > 0 else 1.0
    scale = len(adapter_weight) / sum(adapter_weight.values())
    adapter_weight = {k: w * scale for k, w in adapter_weight.items()}
    current = rank
    budget = 1.0 - objective.min_retention if objective.min_retention is not None else None
    while True:
        for _ in range(objective.max_rounds if budget is not None else 1):
            weights = [adapter_weight[name] for name, modules, *_ in parts for _ in modules]
            tucker = objective.fit(layers, factors, current, energy, n_iter, weights)
            sums = per_adapter(tucker)
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


def _empty(b: torch.Tensor, a: torch.Tensor, n_layers: int) -> Tucker2:
    """A rank-1 Tucker2 of zeros for ``n_layers`` layers of ``b``'s and ``a``'s shapes: its error is the norm."""
    return Tucker2(
        torch.zeros(n_layers, 1, 1, dtype=torch.float64),
        torch.zeros(int(b.shape[0]), 1, dtype=torch.float64),
        torch.zeros(int(a.shape[1]), 1, dtype=torch.float64),
    )


def _clipped_notes(zoo: ZooFiles, rank: tuple[int, int] | None, energy: float | None) -> list[str]:
    if rank is None or energy is not None:
        return []
    # a rank raised for min_retention has its own note
    return [note for name, g in zoo.groups.items() if (note := clipped_rank_note(name, rank, g.rank))]


def add_to_zoo(
    zoo_dir: str | os.PathLike,
    source: str | os.PathLike,
    *,
    name: str | None = None,
    refit: bool = False,
    rank: int | tuple[int, int] | None = None,
    energy: float | None = None,
    n_iter: int = 0,
    progress: Progress | None = None,
) -> ZooReport:
    """Fold a new adapter into an existing zoo, rewriting the zoo folder atomically.

    By default the new adapter is projected onto the zoo's bases (``G_l = U^T dW_l V``), and
    no other adapter changes; a group the zoo lacks is decomposed on its own as a new group.
    With ``refit`` the whole zoo is compressed again, the existing adapters taken as the zoo
    holds them, at ``rank`` / ``energy`` (default: each group's current rank).

    Returns the zoo's report; the new adapter's row gives its exact relative error.
    """
    start = time.perf_counter()
    zoo = read_zoo(zoo_dir)
    chosen = _names([str(source)], [name] if name else None)[0]
    if chosen in zoo.adapters:
        raise ValueError(f"the zoo already has an adapter {chosen!r}; pass another name")
    new = _Source(source)
    if new.base and zoo.base_model.get("name_or_path") and new.base != zoo.base_model["name_or_path"]:
        raise ValueError(f"{source} adapts {new.base}, but the zoo is for {zoo.base_model['name_or_path']}")
    module_shapes = {m: tuple(g.shape) for g in zoo.groups.values() for m in g.modules}
    for module, shape in new.modules.items():
        if module in module_shapes and module_shapes[module] != shape:
            raise ValueError(f"module {module!r} is {shape} in {source} but {module_shapes[module]} in the zoo")
    if refit:
        existing = {n: _ZooMember(zoo, n) for n in zoo.adapters}
        sources: dict[str, Any] = {**existing, chosen: new}
        shapes = {**module_shapes, **new.modules}
        ranks = {tuple(g.rank) for g in zoo.groups.values()}
        target = normalize_rank(rank) if rank is not None else (ranks.pop() if len(ranks) == 1 else None)
        refitted, _, _ = _compress(
            sources, shapes, target, energy, n_iter, _zoo_groups(zoo, shapes), progress or no_progress
        )
        for n, entry in zoo.adapters.items():
            refitted.adapters[n].source = entry.source
            refitted.adapters[n].lora_params = entry.lora_params
        zoo = refitted
    else:
        _project(zoo, chosen, new, progress or no_progress)
    with atomic_dir(zoo_dir, force=True) as tmp:
        write_zoo(tmp, zoo)
    separate = {n: a.lora_params for n, a in zoo.adapters.items()}
    return _report(zoo, str(zoo_dir), time.perf_counter() - start, separate, [])


def _zoo_groups(zoo: ZooFiles, shapes: dict[str, tuple[int, int]]) -> dict[str, list[str]]:
    """The zoo's groups as explicit module lists, plus ``by_name`` groups for modules it lacks."""
    groups = {name: list(g.modules) for name, g in zoo.groups.items()}
    known = {m for modules in groups.values() for m in modules}
    for group in group_modules({m: s for m, s in shapes.items() if m not in known}, "by_name"):
        groups[group.name if group.name not in groups else f"{group.name}_new"] = list(group.modules)
    return groups


class _ZooMember:
    """An adapter already in a zoo, as LoRA factors ``B = U``, ``A = G_l V^T`` (for a refit)."""

    def __init__(self, zoo: ZooFiles, name: str) -> None:
        self.files = zoo.adapter(name)
        self.path = zoo.adapters[name].source
        self.modules = {m: tuple(g.shape) for g in self.files.groups.values() for m in g.modules}
        self.n_params = zoo.adapters[name].lora_params
        self.fan_in_fan_out = any(g.fan_in_fan_out for g in self.files.groups.values())
        self.base = zoo.base_model.get("name_or_path")

    def load(self, names: list[str]) -> tuple[list[torch.Tensor], list[torch.Tensor], list[float]]:
        group_of = {m: g for g, layout in self.files.groups.items() for m in layout.modules}
        bs = [self.files.factor(group_of[m], OUT_FACTOR).double() for m in names]
        as_ = [self.files.core(m).double() @ self.files.factor(group_of[m], IN_FACTOR).double().T for m in names]
        return bs, as_, [1.0] * len(names)

    def load_modules_to_save(self) -> dict[str, torch.Tensor]:
        return self.files.modules_to_save


def _project(zoo: ZooFiles, name: str, source: _Source, progress: Progress) -> None:
    """Add adapter ``name`` to ``zoo`` by projecting it onto the zoo's bases (new groups decomposed alone)."""
    entry = ZooAdapter(source.path, {}, source.n_params)
    group_of = {m: g for g, layout in zoo.groups.items() for m in layout.modules}
    err_sq = ref_sq = 0.0
    by_group: dict[str | None, list[str]] = {}
    for module in sorted(source.modules, key=module_order):
        by_group.setdefault(group_of.get(module), []).append(module)
    new_modules = by_group.pop(None, [])
    for group, modules in progress(list(by_group.items()), "projecting", len(by_group)):
        bs, as_, scales = source.load(modules)
        bs, as_ = [b.double() for b in bs], [a.double() for a in as_]  # the projection in float64
        u = zoo.tensors[factor_key(group, OUT_FACTOR)].double()
        v = zoo.tensors[factor_key(group, IN_FACTOR)].double()
        # the best cores for fixed factors: G_l = pinv(U) (s_l B_l A_l) pinv(V)^T, never forming B_l A_l
        pinv_u, pinv_v = torch.linalg.pinv(u), torch.linalg.pinv(v)
        cores = torch.stack([s * (pinv_u @ b) @ (a @ pinv_v.T) for b, a, s in zip(bs, as_, scales, strict=True)])
        for module, core in zip(modules, cores, strict=True):
            zoo.tensors[zoo_core_key(name, module)] = core.float().contiguous()
        entry.groups[group] = modules
        norm_sq = lowrank_norm_sq(bs, as_, scales)
        error = relative_error_lowrank(Tucker2(cores, u, v), bs, as_, scales)
        err_sq += error**2 * norm_sq
        ref_sq += norm_sq
    if new_modules:  # projection types the zoo lacks: decomposed alone, at full rank, as new groups
        shapes = {m: source.modules[m] for m in new_modules}
        extra, _, _ = _compress({name: source}, shapes, None, None, 0, "by_name", progress)
        for group, layout in extra.groups.items():
            stored = group if group not in zoo.groups else f"{group}_{name}"
            zoo.groups[stored] = layout
            for which in (OUT_FACTOR, IN_FACTOR):
                zoo.tensors[factor_key(stored, which)] = extra.tensors[factor_key(group, which)]
            entry.groups[stored] = extra.adapters[name].groups[group]
            for module in entry.groups[stored]:
                zoo.tensors[zoo_core_key(name, module)] = extra.tensors[zoo_core_key(name, module)]
        bs, as_, scales = source.load(new_modules)
        ref_sq += lowrank_norm_sq(bs, as_, scales)  # exact: adds to the reference, not to the error
    for key, tensor in source.load_modules_to_save().items():
        zoo.tensors[zoo_saved_key(name, key)] = tensor
    entry.modules_to_save = sorted({k.rsplit(".", 1)[0] for k in source.load_modules_to_save()})
    entry.relative_error = math.sqrt(err_sq / ref_sq) if ref_sq > 0 else 0.0
    zoo.adapters[name] = entry


def inspect_zoo(path: str | os.PathLike) -> ZooReport:
    """Per adapter its relative error and parameters, per group its shape and rank, and the total storage.

    A zoo compressed with calibration also shows each adapter's output errors (and healed
    errors), from its ``compression_report.json``.
    """
    zoo = read_zoo(path)
    report = _report(zoo, str(path), 0.0, {n: a.lora_params for n, a in zoo.adapters.items()}, [])
    rows = [{"adapter": a.adapter} for a in report.adapters]
    add_report_columns(rows, path, "adapters", "adapter")
    for entry, row in zip(report.adapters, rows, strict=True):
        for key in _ERROR_COLUMNS:
            setattr(entry, key, row.get(key))
    add_report_columns(report.groups, path, "groups", "group")
    return report


def _heal_zoo(
    zoo: ZooFiles,
    sources: dict[str, _Source],
    cal: Calibration,
    errors: dict[tuple[str, str], dict[str, ErrorSums]],
    progress: Progress,
) -> dict[str, Any]:
    """Heal each adapter's cores against its own LoRA, in place in ``zoo``; add the healed errors to ``errors``.

    Returns each adapter's heal report (as a dict).
    """
    from ..nn.heal import LoRATeacher, heal_adapter  # the torch bindings, only when healing

    assert cal.base_model is not None and cal.inputs is not None and cal.stats is not None
    reports = {}
    for name, source in sources.items():
        files = zoo.adapter(name)
        modules = [m for layout in files.groups.values() for m in layout.modules]
        bs, as_, scales = source.load(modules)
        updates = {m: (b.float(), a.float(), s) for m, b, a, s in zip(modules, bs, as_, scales, strict=True)}
        teacher = LoRATeacher(updates, source.load_modules_to_save())
        healed, report = heal_adapter(
            cal.base_model, files, teacher, cal.inputs, steps=cal.heal_steps, lr=cal.heal_lr,
            held_out=cal.held_out, progress=progress,
        )  # fmt: skip
        reports[name] = report.to_dict()
        for group, layout in healed.groups.items():
            for module in layout.modules:
                zoo.tensors[zoo_core_key(name, module)] = healed.core(module).float().contiguous()
            b, a, s = source.load(layout.modules)
            tucker = Tucker2(
                torch.stack([healed.core(m).double() for m in layout.modules]),
                healed.factor(group, OUT_FACTOR).double(),
                healed.factor(group, IN_FACTOR).double(),
            )
            errors[(name, group)]["healed"] = error_sums(tucker, b, a, s, cal.stats.factors(layout.modules))
    return reports
