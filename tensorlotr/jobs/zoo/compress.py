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
from .fit import FAIRNESS, Objective, fit_zoo
from .heal import heal_zoo
from .report import ZooReport, zoo_report
from .sources import Source, adapter_names, check_same_base, read_source

if TYPE_CHECKING:
    from ...nn.calibration import CalibrationStats


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
    if min_retention is not None and not 0.0 < float(min_retention) < 1.0:
        raise ValueError(f"min_retention must be in (0, 1), got {min_retention!r}")
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
    objective = Objective(stats, cal, fairness, min_retention)
    zoo, errors, notes = fit_zoo(loaded, shapes, requested, energy, n_iter, groups, progress, objective)
    notes = _clipped_notes(zoo, requested, energy) + notes
    heals: dict[str, Any] = {}
    if cal is not None and cal.heal_steps:
        heals = heal_zoo(zoo, loaded, cal, errors, progress)
    separate = {name: s.n_params for name, s in loaded.items()}
    report = zoo_report(zoo, str(out_dir) if out_dir is not None else None, 0.0, separate, notes, errors)
    for entry in report.adapters:
        entry.heal = heals.get(entry.adapter)
    report.calibration = stats.summary() if stats is not None else None
    if out_dir is not None:
        with atomic_dir(out_dir, force=force) as tmp:
            write_zoo(tmp, zoo)
            if cal is not None:
                write_report(tmp, report)
    report.seconds = time.perf_counter() - start
    return report


def _clipped_notes(zoo: ZooFiles, rank: tuple[int, int] | None, energy: float | None) -> list[str]:
    """The notes of the groups kept below ``rank`` because their exact rank is lower."""
    if rank is None or energy is not None:
        return []
    # a rank raised for min_retention has its own note
    return [note for name, g in zoo.groups.items() if (note := clipped_rank_note(name, rank, g.rank))]
