"""PEFT LoRA -> LoTR: ``convert_lora``, a LoRA folder converted to a LoTR adapter.

Conversion stacks the LoRA updates of each group (one projection type across layers) and
takes their Tucker-2 with :func:`tensorlotr.tucker2_lowrank`, never forming a dense update.
The way back is :func:`tensorlotr.jobs.export.export_lora`.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import torch

from ..adapter import Group, LoTRAdapterFiles, group_modules
from ..core import lowrank_norm_sq, normalize_rank, relative_error_lowrank, tucker2_lowrank, tucker2_weighted
from ..files.atomic import check_output
from ..io import is_lotr_dir
from ..io.peft_lora import PeftLoRA
from ..io.zoo_format import is_zoo_dir
from ..progress import Progress
from .calibration import (
    REPORT_NAME,
    Calibration,
    CalibrationStats,
    ErrorSums,
    as_calibration,
    compression_document,
    error_sums,
    group_tucker,
)
from .driver import AdapterReport, GroupOutcome, run_plan, save_adapter
from .export import ExportReport, export_lora
from .inspect import InspectReport, inspect_adapter

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
    peft_dir: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    *,
    rank: int | tuple[int, int] | None = None,
    energy: float | None = None,
    n_iter: int = 0,
    groups: str | dict[str, list[str]] = "by_name",
    force: bool = False,
    progress: Progress | None = None,
    calibration: Calibration | CalibrationStats | None = None,
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
    if is_zoo_dir(peft_dir):
        raise ValueError(
            f"{peft_dir} is a LoTR zoo, not a PEFT LoRA; export-lora --adapter NAME gives one of its LoRAs"
        )
    if is_lotr_dir(peft_dir):
        raise ValueError(f"{peft_dir} is a LoTR adapter already, not a PEFT LoRA")
    lora = PeftLoRA(peft_dir)
    plan = group_modules({m.name: m.shape for m in lora.modules.values()}, groups)
    cal = as_calibration(calibration)
    stats = cal.statistics(list(lora.modules), progress) if cal is not None else None
    sums: dict[str, ErrorSums] = {}

    def convert_group(group: Group) -> GroupOutcome:
        names = list(group.modules)
        bs, as_, scales = lora.load(names)
        bs = [b.float() if b.dtype != torch.float64 else b for b in bs]
        as_ = [a.float() if a.dtype != torch.float64 else a for a in as_]
        # the stack has rank at most sum_l r_l in both modes: never pad beyond it
        (d_out, d_in), total = group.shape, sum(lora.modules[n].rank for n in names)
        exact = (min(d_out, len(names) * d_in, total), min(d_in, len(names) * d_out, total))
        clipped = None if requested is None else (min(requested[0], exact[0]), min(requested[1], exact[1]))
        factors = stats.factors(names) if stats is not None else None
        if cal is None or factors is None or cal.objective == "weight":
            tucker = tucker2_lowrank(bs, as_, clipped, scale=scales, energy=energy, n_iter=n_iter)
        else:  # output-aware: float64, as the calibration statistics
            b64, a64 = [b.double() for b in bs], [a.double() for a in as_]
            tucker = tucker2_weighted(
                b64, a64, factors, clipped, scale=scales, energy=energy, damping=cal.damping, n_iter=cal.n_iter
            )
        norm_sq = lowrank_norm_sq(bs, as_, scales)
        error = relative_error_lowrank(tucker, bs, as_, scales)
        lora_rank = max(lora.modules[n].rank for n in names)
        details = {"lora_rank": (lora_rank, lora_rank), "lora_params": sum(lora.modules[n].n_params for n in names)}
        if factors is not None:
            sums[group.name] = error_sums(tucker, bs, as_, scales, factors)
            details["output_error"] = sums[group.name].output_error
        return GroupOutcome(tucker, norm_sq, error**2 * norm_sq, lora.fan_in_fan_out, details)

    done = run_plan(plan, convert_group, progress=progress, desc="converting", rank=None if energy else requested)
    modules_to_save = done.builder.add_saved(lora.load_modules_to_save())
    base = {"name_or_path": lora.config.get("base_model_name_or_path"), "task_type": lora.config.get("task_type")}
    files = done.builder.build(lora.config.get("target_modules"), groups, modules_to_save, base)
    heal = None
    if cal is not None and cal.heal_steps:
        files, heal = _heal(files, lora, cal, done.groups, progress)
        done.notes.append(heal.text())
    report = ConversionReport(
        source=str(peft_dir),
        output=str(out_dir) if out_dir is not None else None,
        groups=done.groups,
        modules_to_save=modules_to_save,
        relative_error=done.relative_error,
        seconds=time.perf_counter() - start,
        notes=done.notes,
        output_error=sum(sums.values(), ErrorSums()).output_error if sums else None,
        calibration=stats.summary() if stats is not None else None,
        heal=heal.to_dict() if heal is not None else None,
        adapter=files,
    )
    documents = {REPORT_NAME: compression_document(report)} if cal is not None else None
    save_adapter(files, out_dir, force=force, documents=documents)
    report.seconds = time.perf_counter() - start
    return report


def _heal(files: LoTRAdapterFiles, lora: PeftLoRA, cal: Calibration, rows: list[Any], progress: Progress | None):
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
        sums = error_sums(group_tucker(healed, row.group), b, a, s, cal.stats.factors(modules))
        row.healed_error, row.healed_output_error = sums.weight_error, sums.output_error
    return healed, report
