"""Compressing a zoo: many adapters of one base into one shared Tucker-2 basis per group (``compress_zoo``).

The adapters are read (:mod:`~tensorlotr.jobs.zoo.sources`), fitted group by group
(:mod:`~tensorlotr.jobs.zoo.fit`), healed when the calibration asks for it
(:mod:`~tensorlotr.jobs.zoo.heal`), and written atomically as a zoo folder, with the
compression report beside it when calibrated.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

from ...adapter import module_order
from ...adapter.layout import ZooFiles
from ...core import clipped_rank_note, normalize_rank
from ...files.atomic import atomic_dir, check_output
from ...io.zoo_format import write_zoo
from ...progress import Progress, no_progress
from ..calibration import Calibration, as_calibration
from ..compression_report import write_report
from ..retention import held_out_retention, retention_note
from .fit import FAIRNESS, Objective, fit_zoo
from .heal import heal_zoo
from .report import PairErrors, ZooReport, zoo_report
from .residual import fit_residual, residual_params
from .sources import Source, adapter_names, check_same_base, read_source

if TYPE_CHECKING:
    from ...nn.calibration import CalibrationStats
    from ...nn.evaluate import Retention


def compress_zoo(
    sources: list[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str] | None = None,
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
    residual_rank: int | dict[str, int] | None = None,
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
        With held-out inputs for every adapter (the calibration's ``evaluation``, by default
        the last eighth of its inputs, or one :class:`~tensorlotr.jobs.calibration.Evaluation`
        per adapter by name): hold every adapter's held-out retention figure (its retained
        gain with labels, else its agreement with its LoRA) at least this high on its 95% lower
        bound (:attr:`tensorlotr.nn.evaluate.Retention.lower_bound`), by giving the adapters
        short of it a private residual (``residual_rank``), raised a step at a time (1, 2, 3, 4,
        6, 9, ...) in the groups where they lose most, until it holds; the notes say which
        adapter needed which ranks, or that one could not be held
        at the largest residual (which is lossless). Without held-out inputs: guarantee every
        adapter this share of its energy in every group (``1 - relative error^2``, of the output
        error with calibration): adapters short of it are weighted up, and if reweighting does
        not get there the group's rank is raised (noted in the report). ``None``: no guarantee.
    residual_rank : int or dict of str to int, optional
        A private residual of this rank (``s_out = s_in``) beside the shared basis in every
        group of every adapter, or of the adapters named (:mod:`~tensorlotr.jobs.zoo.residual`):
        for adapters that the shared basis does not span. Its factors and larger cores count in
        the zoo's storage; clipped to what the adapter's residual holds.

    Returns
    -------
    ZooReport
        Per adapter: its separate size, the cores it adds, its exact relative error (and,
        with calibration, its output error before and after the heal); per group: shape,
        rank and how many adapters use it; per adapter and group the same errors
        (``adapter_groups``); storage against the separate adapters. ``report.zoo`` holds
        the zoo in memory.

    Examples
    --------
    ``lora-a/`` and ``lora-b/`` hold rank-4 LoRAs on ``q_proj`` and ``v_proj`` of one 2-layer
    base of hidden size 32 (1,024 parameters each):

    >>> report = compress_zoo(["lora-a", "lora-b"], "my-zoo", rank=4)
    >>> [a.adapter for a in report.adapters], [g["rank"] for g in report.groups]
    (['lora-a', 'lora-b'], [[4, 4], [4, 4]])
    >>> report.separate_params, report.stored_params  # per group U and V (32x4 each) and 4 cores (4x4 each)
    (2048, 640)
    >>> from pathlib import Path
    >>> sorted(p.name for p in Path("my-zoo").iterdir())
    ['zoo_config.json', 'zoo_model.safetensors']
    """
    start = time.perf_counter()
    paths = [str(p) for p in sources]
    if not paths:
        raise ValueError("compress_zoo needs at least one source")
    if fairness not in FAIRNESS:
        raise ValueError(f"fairness must be one of {FAIRNESS}, got {fairness!r}")
    if min_retention is not None and (isinstance(min_retention, bool) or not 0.0 < float(min_retention) <= 1.0):
        raise ValueError(f"min_retention must be in (0, 1], got {min_retention!r}")
    cal = as_calibration(calibration)
    if cal is not None and cal.heal_factors:
        raise ValueError("the adapters of a zoo share their factors: healing trains each adapter's cores only")
    check_output(out_dir, force, inputs=paths)
    requested = normalize_rank(rank)
    chosen = adapter_names(paths, names)
    loaded: dict[str, Source] = {name: read_source(path) for name, path in zip(chosen, paths, strict=True)}
    shapes = check_same_base(loaded)
    progress = progress or no_progress
    stats = cal.statistics(sorted(shapes, key=module_order), progress) if cal is not None else None
    held = _check_evaluation(cal, chosen, min_retention)
    objective = Objective(stats, cal, fairness, None if held else min_retention)  # held out: residuals instead
    zoo, errors, notes = fit_zoo(loaded, shapes, requested, energy, n_iter, groups, progress, objective)
    notes = _clipped_notes(zoo, requested, energy) + notes
    explicit = _residual_ranks(residual_rank, list(loaded))
    for name, size in explicit.items():
        fit_residual(zoo, name, loaded[name], {g: (size, size) for g in zoo.adapters[name].groups}, errors, cal)
    heals: dict[str, Any] = {}
    if cal is not None and cal.heal_steps:
        heals = heal_zoo(zoo, loaded, cal, errors, progress)
    retentions = {name: _retention(zoo, name, loaded[name], cal) for name in loaded}
    if held and min_retention is not None:
        for name in loaded:
            found = retentions[name]
            if found is None or found.holds(min_retention):
                continue
            retentions[name], note, healed = _hold(zoo, name, loaded, cal, errors, progress, min_retention,
                                                   explicit.get(name, 0))  # fmt: skip
            heals.update(healed)
            notes.append(note)
    for name, found in retentions.items():
        if found is not None:
            notes.append(retention_note(f"adapter {name}", found, min_retention if held else None))
    separate = {name: s.n_params for name, s in loaded.items()}
    report = zoo_report(zoo, str(out_dir) if out_dir is not None else None, 0.0, separate, notes, errors)
    for entry in report.adapters:
        entry.heal = heals.get(entry.adapter)
        found = retentions.get(entry.adapter)
        if found is not None:
            entry.agreement, entry.retained_gain = found.agreement, found.retained_gain
            entry.retention = found.to_dict()
    report.calibration = stats.summary() if stats is not None else None
    if out_dir is not None:
        with atomic_dir(out_dir, force=force) as tmp:
            write_zoo(tmp, zoo)
            if cal is not None:
                write_report(tmp, report)
    report.seconds = time.perf_counter() - start
    return report


def _check_evaluation(cal: Calibration | None, names: list[str], min_retention: float | None) -> bool:
    """Whether every adapter has held-out inputs (``min_retention`` is then held on them); bad input refused."""
    held = cal is not None and cal.base_model is not None and all(cal.evaluation_for(n) for n in names)
    if cal is not None and isinstance(cal.evaluation, dict):
        unknown = sorted(set(cal.evaluation) - set(names))
        lacking = [n for n in names if n not in cal.evaluation]
        if unknown:
            raise ValueError(f"the evaluation data name adapters {unknown} that are not in the zoo; adapters: {names}")
        if lacking and min_retention is not None:
            raise ValueError(
                f"min_retention is held on each adapter's held-out inputs, and adapters {lacking} have none: "
                "give every adapter its own (--eval-data NAME=FILE), or one set for all"
            )
    if min_retention is not None and not held and min_retention >= 1.0:
        raise ValueError(
            "min_retention 1 of the energy keeps every adapter exactly: leave rank unset (the exact rank) instead"
        )
    return held


def _retention(zoo: ZooFiles, name: str, source: Source, cal: Calibration | None) -> Retention | None:
    """Adapter ``name``'s held-out retention against its LoRA, when the calibration has held-out inputs for it."""
    if cal is None or cal.base_model is None or cal.evaluation_for(name) is None:
        return None
    modules = zoo.adapters[name].modules
    bs, as_, scales = source.load(modules)
    updates = {m: (b, a, s) for m, b, a, s in zip(modules, bs, as_, scales, strict=True)}
    return held_out_retention(cal, zoo.adapter(name), updates, source.load_modules_to_save(), adapter=name)


def _hold(
    zoo: ZooFiles,
    name: str,
    sources: dict[str, Source],
    cal: Calibration | None,
    errors: PairErrors,
    progress: Progress,
    min_retention: float,
    start: int,
) -> tuple[Retention | None, str, dict[str, Any]]:
    """Raise adapter ``name``'s residual ranks until its held-out figure holds; its retention, note and heal report.

    Each round raises the residual (1, 2, 3, 4, 6, 9, 13, ... from ``start``) in the groups that
    hold the larger half of what the adapter still loses (its squared calibrated output error,
    or weight error, summed over the group), so the rank goes where the adapter needs it.
    """
    groups = list(zoo.adapters[name].groups)
    ranks = {g: start for g in groups}
    full: set[str] = set()  # groups at the largest residual they can take
    found, heals = None, {}
    while len(full) < len(groups):
        picked = _lossiest(errors, name, [g for g in groups if g not in full])
        wanted = {g: _next_size(ranks[g]) for g in picked}
        ranks.update(wanted)
        fit_residual(zoo, name, sources[name], {g: (r, r) for g, r in ranks.items() if r > 0}, errors, cal)
        if cal is not None and cal.heal_steps:
            heals = heal_zoo(zoo, sources, cal, errors, progress, names=[name])
        found = _retention(zoo, name, sources[name], cal)
        kept = zoo.adapters[name].residual
        for g in picked:  # a rank clipped below the one asked for: the group has no more to give
            ranks[g] = max(kept.get(g, (0, 0)))
            if ranks[g] < wanted[g]:
                full.add(g)
        if found is None or found.holds(min_retention):
            break
    assert found is not None
    ranks_text = "/".join(f"{g} {r[0]}" for g, r in zoo.adapters[name].residual.items()) or "0"
    extra = sum(residual_params(zoo, name, g, r) for g, r in zoo.adapters[name].residual.items())
    if found.holds(min_retention):
        note = (
            f"adapter {name}: a private residual ({ranks_text}; {extra:,} params) holds min_retention "
            f"{min_retention:.0%} ({found.figure_name} {found.figure:.1%} on held-out inputs, "
            f"95% lower bound {found.lower_bound:.1%})"
        )
    else:
        note = (
            f"adapter {name}: min_retention {min_retention:.0%} NOT held: at the largest residual ({ranks_text}; "
            f"{extra:,} params), its {found.figure_name} is {found.figure:.1%} on held-out inputs "
            f"(95% lower bound {found.lower_bound:.1%})"
        )
    return found, note, heals


def _lossiest(errors: PairErrors, name: str, groups: list[str]) -> list[str]:
    """The groups holding the larger half of adapter ``name``'s squared (output) error, largest first."""

    def lost(group: str) -> float:
        sums = errors[(name, group)]["compressed"]
        return sums.output if sums.output is not None else sums.weight

    ordered = sorted(groups, key=lost, reverse=True)
    total, picked, running = sum(lost(g) for g in groups), [], 0.0
    for group in ordered:
        picked.append(group)
        running += lost(group)
        if running >= total / 2:
            break
    return picked


def _next_size(size: int) -> int:
    """The residual rank to try after ``size``: one more up to 4, then half again (1, 2, 3, 4, 6, 9, 13, ...).

    >>> [_next_size(s) for s in (0, 3, 4, 6, 8, 12)]
    [1, 4, 6, 9, 12, 18]
    """
    return size + 1 if size < 4 else size + size // 2


def _residual_ranks(residual_rank: int | dict[str, int] | None, names: list[str]) -> dict[str, int]:
    """``residual_rank`` as a rank per adapter (those with none left out), checked."""
    if residual_rank is None:
        return {}
    wanted = residual_rank if isinstance(residual_rank, dict) else {name: residual_rank for name in names}
    unknown = sorted(set(wanted) - set(names))
    if unknown:
        raise ValueError(f"residual_rank names adapters {unknown} that are not in the zoo; adapters: {names}")
    for name, size in wanted.items():
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(f"residual_rank of adapter {name!r} must be a whole number >= 0, got {size!r}")
    return {name: size for name, size in wanted.items() if size > 0}


def _clipped_notes(zoo: ZooFiles, rank: tuple[int, int] | None, energy: float | None) -> list[str]:
    """The notes of the groups kept below ``rank`` because their exact rank is lower."""
    if rank is None or energy is not None:
        return []
    # a rank raised for min_retention has its own note
    return [note for name, g in zoo.groups.items() if (note := clipped_rank_note(name, rank, g.rank))]
