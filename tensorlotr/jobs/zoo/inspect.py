"""Inspecting a zoo: its adapters, groups and storage, with the errors of its compression report (``inspect_zoo``)."""

from __future__ import annotations

import os

from ...io.zoo_format import read_zoo
from ..compression_report import add_report_columns
from .report import ERROR_COLUMNS, ZooReport, zoo_report


def inspect_zoo(path: str | os.PathLike[str]) -> ZooReport:
    """Per adapter its relative error and parameters, per group its shape and rank, and the total storage.

    A zoo compressed with calibration also shows each adapter's output errors (and healed
    errors), from its ``compression_report.json``.

    Examples
    --------
    ``lora-a/`` and ``lora-b/`` hold rank-4 LoRAs on ``q_proj`` and ``v_proj`` of one 2-layer
    base of hidden size 32:

    >>> from tensorlotr.jobs.zoo import compress_zoo
    >>> _ = compress_zoo(["lora-a", "lora-b"], "my-zoo", rank=4)
    >>> info = inspect_zoo("my-zoo")
    >>> [a.adapter for a in info.adapters], [(g["group"], g["rank"]) for g in info.groups]
    (['lora-a', 'lora-b'], [('q_proj', [4, 4]), ('v_proj', [4, 4])])
    """
    zoo = read_zoo(path)
    report = zoo_report(zoo, None, 0.0, {n: a.lora_params for n, a in zoo.adapters.items()}, [])
    report.path = str(path)
    rows = [{"adapter": a.adapter} for a in report.adapters]
    add_report_columns(rows, path, "adapters", "adapter")
    for entry, row in zip(report.adapters, rows, strict=True):
        for key in ERROR_COLUMNS:
            setattr(entry, key, row.get(key))
    add_report_columns(report.groups, path, "groups", "group")
    return report
