"""The one result type of every job, and its renderings: a text table and JSON."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any


class Result:
    """Base of every job's result (a dataclass): ``to_dict()`` for ``--json``, ``text()`` for the terminal.

    Subclasses add derived values to :meth:`to_dict` and write :meth:`text`. Indexing
    (``result["groups"]``) reads :meth:`to_dict`, as when jobs returned plain dicts.

    Examples
    --------
    >>> from dataclasses import dataclass
    >>> @dataclass
    ... class Count(Result):
    ...     name: str
    ...     shape: tuple[int, int]
    ...     def text(self) -> str:
    ...         return f"{self.name}: {format_value(self.shape)}"
    >>> result = Count("query", (384, 384))
    >>> print(result)
    query: 384x384
    >>> result["shape"]  # shapes and ranks become lists
    [384, 384]
    """

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: fields, then derived values; ranks and shapes are lists.

        Fields declared with ``metadata={"json": False}`` (an adapter held in memory) are left out.
        """
        return {
            f.name: _plain(_asdict(getattr(self, f.name)))
            for f in dataclasses.fields(self)  # type: ignore[arg-type]
            if f.metadata.get("json", True)
        }

    def text(self) -> str:
        """A readable summary for the terminal."""
        raise NotImplementedError

    def to_json(self) -> str:
        """:meth:`to_dict` as indented JSON."""
        return to_json(self.to_dict())

    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]

    def __str__(self) -> str:
        return self.text()


def _asdict(value: object) -> object:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, (list, tuple)):
        return [_asdict(v) for v in value]
    return value


def _plain(value: object) -> object:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def format_value(value: object) -> str:
    """A table cell: floats in short scientific or fixed form, ints with thousands separators.

    Examples
    --------
    >>> [format_value(v) for v in (1234567, 0.00012, 0.5, (384, 384), True)]
    ['1,234,567', '1.200e-04', '0.5000', '384x384', 'yes']
    """
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e6):
            return f"{value:.3e}"
        return f"{value:.4f}"
    if isinstance(value, (tuple, list)):
        return "x".join(str(v) for v in value)
    return str(value)


def format_table(rows: Sequence[Mapping[str, object]], columns: Sequence[str] | None = None) -> str:
    """Rows of dicts as an aligned text table; numbers are right-aligned.

    Examples
    --------
    >>> print(format_table([{"group": "query", "params": 6528}, {"group": "value", "params": 6528}]))
    group  params
    -----  ------
    query   6,528
    value   6,528
    """
    if not rows:
        return "(empty)"
    columns = list(columns or rows[0].keys())
    cells = [[format_value(row.get(col, "")) for col in columns] for row in rows]
    widths = [max(len(col), *(len(r[i]) for r in cells)) for i, col in enumerate(columns)]
    numeric = [all(isinstance(row.get(col), (int, float)) for row in rows) for col in columns]

    def line(values: Sequence[str]) -> str:
        return "  ".join(
            v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric, strict=False)
        ).rstrip()

    return "\n".join([line(columns), line(["-" * w for w in widths]), *(line(r) for r in cells)])


def to_json(report: object) -> str:
    """A report as indented JSON; tuples become lists, non-finite floats become strings.

    Examples
    --------
    >>> print(to_json({"rank": (8, 8), "error": float("nan")}))
    {
      "rank": [
        8,
        8
      ],
      "error": "nan"
    }
    """

    def clean(value: object) -> object:
        if isinstance(value, dict):
            return {str(k): clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        if isinstance(value, float) and not math.isfinite(value):
            return str(value)
        return value

    return json.dumps(clean(report), indent=2)
