"""PEFT LoRA -> LoTR: ``convert_lora``, a LoRA folder converted to a LoTR adapter.

Conversion stacks the LoRA updates of each group (one projection type across layers) and
takes their Tucker-2 with :func:`tensorlotr.tucker2_lowrank`, never forming a dense update.
The way back is :func:`tensorlotr.jobs.export.export_lora`.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..adapter import LoTRAdapterFiles
from ..adapter.layout import expected_shapes
from ..adapter.lora import GroupConversion, OutputWeighting, lora_to_lotr
from ..core import normalize_rank
from ..files.atomic import check_output
from ..io import is_lotr_dir
from ..io.peft_lora import PeftLoRA
from ..io.zoo_format import is_zoo_dir
from ..progress import Progress
from .calibration import Calibration, ErrorSums, as_calibration, error_sums
from .compression_report import REPORT_NAME, compression_document
from .driver import AdapterReport, GroupReport, save_adapter
from .export import ExportReport, export_lora, output_dtype
from .inspect import InspectReport, inspect_adapter
from .retention import check_min_retention, held_out_retention, retention_note

if TYPE_CHECKING:
    from ..nn.calibration import CalibrationStats
    from ..nn.evaluate import Retention
    from ..nn.heal import HealReport

#: ``export_lora`` and ``inspect_adapter`` are documented as ``tensorlotr.convert``'s too.
__all__ = ["ConversionReport", "ExportReport", "InspectReport", "convert_lora", "export_lora", "inspect_adapter"]


@dataclass(kw_only=True)
class ConversionReport(AdapterReport):
    """What :func:`convert_lora` wrote: per group the LoRA it came from and the LoTR it became.

    Examples
    --------
    ``my-lora/`` holds a PEFT LoRA of rank 4 on ``q_proj`` and ``v_proj`` of a 2-layer model
    of hidden size 32:

    >>> report = convert_lora("my-lora", None)  # out_dir None: the report only
    >>> report.to_dict()["groups"][0]["rank"], report["totals"]["compression"]
    ([8, 8], 0.8)
    """


def convert_lora(
    peft_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str] | None = None,
    *,
    rank: int | tuple[int, int] | None = None,
    energy: float | None = None,
    n_iter: int = 0,
    groups: str | dict[str, list[str]] = "by_name",
    force: bool = False,
    progress: Progress | None = None,
    calibration: Calibration | CalibrationStats | None = None,
    dtype: str | torch.dtype | None = None,
    min_retention: float | None = None,
) -> ConversionReport:
    """Convert a PEFT LoRA folder into a LoTR adapter folder.

    Parameters
    ----------
    peft_dir : path
        A folder with ``adapter_config.json`` and ``adapter_model.safetensors`` (or a
        weights-only ``adapter_model.bin``).
    out_dir : path, optional
        Where to write the LoTR adapter (``LoTRModel.from_pretrained`` loads it). It is
        written to a temporary folder and renamed into place; an existing folder is
        refused unless ``force``. ``None`` only computes the report.
    rank : int or (r_out, r_in), optional
        Tucker ranks for every group; ``None`` keeps the exact rank (at most the sum of
        the group's LoRA ranks), so the conversion is lossless.
    energy : float, optional
        Per group and mode, the smallest rank keeping this fraction of the squared
        singular values; ``rank`` then caps it. Groups may end with different ranks.
    n_iter : int
        HOOI sweeps after the HOSVD.
    groups : "by_name", "shared" or dict
        As :class:`tensorlotr.LoTRConfig`'s ``groups``: by default one group per module
        path with the layer index removed (and per shape).
    calibration : Calibration or CalibrationStats, optional
        Output-aware compression (see ``docs/calibration.md``): each group minimises the
        error of its outputs on the calibration inputs, ``sum_l ||(dW_l - U G_l V^T) C_l^{1/2}||``
        (:func:`tensorlotr.core.tucker2_weighted`), instead of the weight error; with
        ``heal_steps`` the adapter is then healed against the LoRA (:mod:`tensorlotr.heal`).
        The report adds each group's calibrated output error (before and after the heal),
        and the output folder gets ``compression_report.json``, which ``inspect`` shows.
        With held-out inputs (the calibration's ``evaluation``, by default the last eighth
        of its inputs, unseen by the fit and the heal) the report gives the held-out
        retention (:func:`tensorlotr.nn.evaluate.evaluate_retention`): agreement with the
        LoRA's predictions, output retained and, with labels, the retained gain.
    dtype : str or torch.dtype, optional
        The dtype of the factors and cores written (one of ``"float32"``, ``"float64"``,
        ``"float16"``, ``"bfloat16"``). Default: the LoRA's own, at least float32 (a float64
        LoRA gives a float64 adapter, computed in float64 throughout).
    min_retention : float in (0, 1], optional
        Hold the held-out retention figure (the retained gain with labels, else the
        agreement) at least this high, on its one-sided 95% lower bound (the figure less
        1.645 standard errors: a figure measured on few inputs needs a margin): the rank is
        raised, a quarter at a time, until it holds; the report's notes give the rank that
        holds it (at the exact rank the conversion is lossless). Needs held-out inputs.

    Returns
    -------
    ConversionReport
        Per group: layers, shape, LoRA and LoTR parameters, ranks, and the exact relative
        error (computed in factored form), then the totals.

    Examples
    --------
    ``my-lora/`` holds a PEFT LoRA of rank 4 on ``q_proj`` and ``v_proj`` of a 2-layer model
    of hidden size 32: each group is a stack (2, 32, 32) of rank at most 2 x 4 = 8 per mode.

    >>> report = convert_lora("my-lora", "my-lotr")  # the exact rank: lossless
    >>> [(g.group, g.rank, g.lotr_params, g.lora_params) for g in report.groups]
    [('q_proj', (8, 8), 640, 512), ('v_proj', (8, 8), 640, 512)]
    >>> report.relative_error < 1e-6
    True
    >>> smaller = convert_lora("my-lora", "my-lotr-r4", rank=4)  # 4*32 + 4*32 + 2*4*4 per group
    >>> [(g.rank, g.lotr_params) for g in smaller.groups]
    [((4, 4), 288), ((4, 4), 288)]

    Two layers are too shallow for LoTR to save parameters; see the parameter counts in the
    documentation's Concepts page.
    """
    start = time.perf_counter()
    requested = normalize_rank(rank)
    check_output(out_dir, force, inputs=[peft_dir])
    output_dtype([], dtype)  # a bad dtype is refused before anything is read
    if is_zoo_dir(peft_dir):
        raise ValueError(
            f"{peft_dir} is a LoTR zoo, not a PEFT LoRA; export-lora --adapter NAME gives one of its LoRAs"
        )
    if is_lotr_dir(peft_dir):
        raise ValueError(f"{peft_dir} is a LoTR adapter already, not a PEFT LoRA")
    lora = PeftLoRA(peft_dir)
    stored = output_dtype([getattr(torch, d) for d in lora.dtype.split(",")], dtype)
    cal = as_calibration(calibration)
    check_min_retention(min_retention, cal)
    if min_retention is not None and energy is not None:
        raise ValueError("min_retention raises the rank until it holds; it does not combine with energy (--energy)")
    stats = cal.statistics(list(lora.modules), progress) if cal is not None else None
    weighting = None
    if cal is not None and stats is not None:
        fit = cal.objective != "weight"
        weighting = OutputWeighting(stats.factors, fit=fit, damping=cal.damping, n_iter=cal.n_iter)
    current, tried = requested, []
    while True:
        conversion = lora_to_lotr(
            lora, rank=current, energy=energy, n_iter=n_iter, groups=groups, weighting=weighting, progress=progress,
            dtype=stored,
        )  # fmt: skip
        sums = {g.group: ErrorSums(output=g.output_sq, output_ref=g.output_ref_sq) for g in conversion.groups}
        sums = sums if weighting is not None else {}
        rows = [_row(g, sums.get(g.group)) for g in conversion.groups]
        files, heal, notes = conversion.files, None, list(conversion.notes)
        if cal is not None and cal.heal_steps:
            files, heal = _heal(files, lora, cal, rows, progress)
            notes.append(heal.text())
            adapter_keys = {k for name, group in files.groups.items() for k in expected_shapes(name, group)}
            files.tensors.update({k: files.tensors[k].to(stored) for k in adapter_keys})
        retention = _retention(cal, files, lora)
        ranks = [g.rank for g in conversion.groups]
        if retention is not None:
            tried.append({"rank": [list(r) for r in ranks], **retention.to_dict(), "value": retention.figure})
        if min_retention is None or retention is None or retention.holds(min_retention):
            break
        raised = _raised(ranks, current)
        if raised is None:  # every group at its exact rank: nothing more to give
            break
        current = raised
    if retention is not None:
        notes.append(retention_note("the adapter", retention, min_retention))
    if min_retention is not None and retention is not None and len(tried) > 1:
        first, last = tried[0]["rank"], tried[-1]["rank"]
        verdict = (
            "holds it"
            if retention.holds(min_retention)
            else ("is the exact rank (lossless) and still falls short: too few held-out inputs to show it")
        )
        notes.append(
            f"min_retention {min_retention:.0%}: rank raised from {_ranks_text(first)} to {_ranks_text(last)}, "
            f"which {verdict} ({retention.figure_name} {retention.figure:.1%} on held-out inputs, "
            f"its 95% lower bound {retention.lower_bound:.1%})"
        )
    report = ConversionReport(
        source=str(peft_dir),
        output=str(out_dir) if out_dir is not None else None,
        groups=rows,
        modules_to_save=conversion.modules_to_save,
        relative_error=conversion.relative_error,
        seconds=time.perf_counter() - start,
        notes=notes,
        output_error=sum(sums.values(), ErrorSums()).output_error if sums else None,
        calibration=stats.summary() if stats is not None else None,
        heal=heal.to_dict() if heal is not None else None,
        retention=retention.to_dict() if retention is not None else None,
        retention_tries=tried if len(tried) > 1 else [],
        adapter=files,
    )
    documents = {REPORT_NAME: compression_document(report)} if cal is not None else None
    save_adapter(files, out_dir, force=force, documents=documents)
    report.seconds = time.perf_counter() - start
    return report


def _retention(cal: Calibration | None, files: LoTRAdapterFiles, lora: PeftLoRA) -> Retention | None:
    """The held-out retention of ``files`` against ``lora``, when the calibration has held-out inputs."""
    if cal is None or cal.evaluation_for(None) is None or cal.base_model is None:
        return None
    names = list(lora.modules)
    bs, as_, scales = lora.load(names)
    updates = {n: (b, a, s) for n, b, a, s in zip(names, bs, as_, scales, strict=True)}
    return held_out_retention(cal, files, updates, lora.load_modules_to_save())


def _raised(ranks: list[tuple[int, int]], current: tuple[int, int] | None) -> tuple[int, int] | None:
    """The next rank to try, a quarter above the largest kept (at least one more); None when no group can grow."""
    if current is None:
        return None  # the exact rank already
    top = (max(r[0] for r in ranks), max(r[1] for r in ranks))
    if top[0] < current[0] and top[1] < current[1]:
        return None  # every group was clipped to its exact rank
    return top[0] + max(1, top[0] // 4), top[1] + max(1, top[1] // 4)


def _ranks_text(ranks: list[list[int]]) -> str:
    shown = sorted({f"{r[0]}x{r[1]}" for r in ranks})
    return "/".join(shown)


def _row(group: GroupConversion, sums: ErrorSums | None) -> GroupReport:
    """The report's row of a converted group; ``sums`` carry its calibrated output errors."""
    return GroupReport(
        group=group.group,
        layers=group.layers,
        shape=group.shape,
        rank=group.rank,
        lotr_params=group.lotr_params,
        relative_error=group.relative_error,
        seconds=group.seconds,
        lora_rank=(group.lora_rank, group.lora_rank),
        lora_params=group.lora_params,
        output_error=sums.output_error if sums is not None else None,
    )


def _heal(
    files: LoTRAdapterFiles, lora: PeftLoRA, cal: Calibration, rows: list[GroupReport], progress: Progress | None
) -> tuple[LoTRAdapterFiles, HealReport]:
    """Heal the converted adapter against the LoRA; set each group's errors after the heal in ``rows``."""
    from ..nn.heal import LoRATeacher, heal_adapter  # the torch bindings, only when healing

    names = list(lora.modules)
    bs, as_, scales = lora.load(names)
    teacher = LoRATeacher(
        {n: (b.float(), a.float(), s) for n, b, a, s in zip(names, bs, as_, scales, strict=True)},
        lora.load_modules_to_save(),
    )
    assert cal.base_model is not None and cal.inputs is not None and cal.stats is not None
    healed, report = heal_adapter(
        cal.base_model, files, teacher, cal.inputs, steps=cal.heal_steps, lr=cal.heal_lr,
        train_factors=cal.heal_factors, held_out=cal.held_out, progress=progress,
    )  # fmt: skip
    for row in rows:
        modules = healed.groups[row.group].modules
        b, a, s = lora.load(modules)
        sums = error_sums(healed.tucker(row.group), b, a, s, cal.stats.factors(modules))
        row.healed_error, row.healed_output_error = sums.weight_error, sums.output_error
    return healed, report
