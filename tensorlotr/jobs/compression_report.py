"""The compression report file: ``compression_report.json``, written beside a calibrated job's output.

A calibrated convert, decompose or zoo compression writes its report (:func:`compression_document`)
next to the adapter or zoo it wrote, since the adapter's own files hold no errors; ``inspect``
adds the report's error columns to what it shows (:func:`add_report_columns`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..files.jsonfile import read_json_object
from ..report import Result, to_json

__all__ = ["ERROR_KEYS", "REPORT_NAME", "add_report_columns", "compression_document", "report_section", "write_report"]

#: The file a calibrated job writes next to the adapter or zoo: its report, which ``inspect`` shows.
REPORT_NAME = "compression_report.json"
#: The error columns of a compression report that ``inspect`` shows, in order.
ERROR_KEYS = (
    "relative_error", "output_error", "healed_error", "healed_output_error", "agreement", "retained_gain",
)  # fmt: skip


def compression_document(report: Result) -> dict[str, Any]:
    """The JSON document of a calibrated job's report, written as :data:`REPORT_NAME` beside its output.

    Examples
    --------
    >>> from dataclasses import dataclass
    >>> @dataclass
    ... class Errors(Result):
    ...     groups: list
    >>> document = compression_document(Errors([{"group": "q_proj", "output_error": 0.1}]))
    >>> document["format"], document["groups"]
    ('tensorlotr-compression-report', [{'group': 'q_proj', 'output_error': 0.1}])
    """
    return {"format": "tensorlotr-compression-report", "format_version": 1, **report.to_dict()}


def write_report(folder: str | os.PathLike[str], report: Result) -> Path:
    """Write :func:`compression_document` of ``report`` as ``folder``'s :data:`REPORT_NAME`; returns its path.

    Examples
    --------
    >>> from dataclasses import dataclass
    >>> from pathlib import Path
    >>> @dataclass
    ... class Errors(Result):
    ...     groups: list
    >>> Path("written").mkdir()
    >>> print(write_report("written", Errors([{"group": "q_proj", "output_error": 0.1}])))
    written/compression_report.json
    """
    path = Path(folder) / REPORT_NAME
    path.write_text(to_json(compression_document(report)) + "\n", encoding="utf-8")
    return path


def add_report_columns(rows: list[dict[str, Any]], folder: str | os.PathLike[str], section: str, key: str) -> None:
    """Add the error columns of ``folder``'s :data:`REPORT_NAME`, when it has one, to ``rows`` (in place).

    ``section`` is the report's list (``"groups"`` or ``"adapters"``) and ``key`` the field
    that names a row in it and in ``rows``. A folder without the file (an adapter compressed
    without calibration, or by an older tensorlotr) is left as it is.

    Examples
    --------
    >>> from pathlib import Path
    >>> Path("my-lotr").mkdir()
    >>> _ = Path("my-lotr/compression_report.json").write_text('{"groups": [{"group": "q_proj", "output_error": 0.1}]}')
    >>> rows = [{"group": "q_proj"}, {"group": "v_proj"}]
    >>> add_report_columns(rows, "my-lotr", "groups", "group")
    >>> rows
    [{'group': 'q_proj', 'output_error': 0.1}, {'group': 'v_proj'}]
    """
    path = Path(folder) / REPORT_NAME
    if not path.is_file():
        return
    entries = read_json_object(path).get(section)
    by_name = {e.get(key): e for e in entries if isinstance(e, dict)} if isinstance(entries, list) else {}
    for row in rows:
        entry = by_name.get(row.get(key), {})
        for column in ERROR_KEYS:
            value = entry.get(column)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                row[column] = float(value)


def report_section(folder: str | os.PathLike[str], section: str) -> Any:
    """The ``section`` of ``folder``'s :data:`REPORT_NAME` (None when the folder has no report, or it lacks one).

    Examples
    --------
    >>> from pathlib import Path
    >>> Path("reported").mkdir()
    >>> _ = Path("reported/compression_report.json").write_text('{"retention": {"agreement": 0.98}}')
    >>> report_section("reported", "retention"), report_section("reported", "heal")
    ({'agreement': 0.98}, None)
    """
    path = Path(folder) / REPORT_NAME
    return read_json_object(path).get(section) if path.is_file() else None
