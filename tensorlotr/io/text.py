"""Text data files: the one reader of plain-text and TSV files, for calibration texts and labelled rows.

Two entry points read through one reader, whose errors name the file and the line:

- :func:`read_texts`: texts, one per line, or the first column of a TSV (``.tsv``) after its
  header (the calibration data of the command line);
- :func:`read_tsv`: ``sentence<TAB>label`` rows of a GLUE-style TSV with a header.

Files are UTF-8 (a byte-order mark is accepted); a TSV is read without quoting, one row per line.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator
from pathlib import Path

__all__ = ["read_labelled_texts", "read_texts", "read_tsv"]


class _Lines:
    """The lines of a file decoded from UTF-8, counted: ``number`` is the last one's (from 1)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.number = 0

    def __iter__(self) -> Iterator[str]:
        with self.path.open("rb") as handle:
            for raw in handle:
                self.number += 1
                try:
                    yield raw.decode("utf-8-sig" if self.number == 1 else "utf-8")
                except UnicodeDecodeError as exc:
                    raise ValueError(
                        f"{self.path} is not UTF-8 text ({exc.reason} at line {self.number}, byte {exc.start}); "
                        "save it as UTF-8"
                    ) from None


def _records(path: str | os.PathLike[str], what: str, tsv: bool) -> Iterator[tuple[int, list[str]]]:
    """``(line number, fields)`` of every line of ``path``: a TSV's tab-separated fields, or the line itself.

    Raises ``FileNotFoundError`` (naming ``what`` the file holds) when ``path`` is not a file,
    and ``ValueError`` naming the file and line for text that is not UTF-8.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such {what} file")
    lines = _Lines(path)
    rows = (
        csv.reader(lines, delimiter="\t", quoting=csv.QUOTE_NONE) if tsv else ([line.rstrip("\r\n")] for line in lines)
    )
    for row in rows:
        yield lines.number, row


def read_texts(path: str | os.PathLike[str], limit: int | None = None) -> list[str]:
    """Texts from ``path``: a TSV (``.tsv``, a header row, the text in the first column) or one per line.

    Empty lines are skipped; ``limit`` keeps the first texts only. Raises
    ``FileNotFoundError`` for a missing file and ``ValueError`` for a file without texts or
    one that is not UTF-8.

    Examples
    --------
    >>> from pathlib import Path
    >>> _ = Path("texts.txt").write_text("a moving film\\n\\na dull script\\n")
    >>> read_texts("texts.txt")
    ['a moving film', 'a dull script']
    >>> _ = Path("texts.tsv").write_text("sentence\\tlabel\\na moving film\\t1\\na dull script\\t0\\n")
    >>> read_texts("texts.tsv", limit=1)
    ['a moving film']
    """
    tsv = Path(path).suffix.lower() == ".tsv"
    records = _records(path, "calibration", tsv)
    if tsv:
        next(records, None)  # the header
    texts: list[str] = []
    for _, fields in records:
        text = fields[0] if fields else ""
        if text.strip():
            texts.append(text)
        if limit is not None and len(texts) >= limit:
            break
    if not texts:
        raise ValueError(f"{path}: no calibration texts")
    return texts


def read_tsv(path: str | os.PathLike[str], limit: int | None = None) -> list[tuple[str, int]]:
    """``sentence<TAB>label`` rows of a GLUE-style TSV with a header; labels are ints.

    ``limit`` keeps the first rows only. Errors name the file and line.

    Examples
    --------
    >>> from pathlib import Path
    >>> _ = Path("reviews.tsv").write_text("sentence\\tlabel\\na moving film\\t1\\na dull script\\t0\\n")
    >>> read_tsv("reviews.tsv")
    [('a moving film', 1), ('a dull script', 0)]
    >>> _ = Path("bad.tsv").write_text("sentence\\tlabel\\na moving film\\tgood\\n")
    >>> read_tsv("bad.tsv")
    Traceback (most recent call last):
    ...
    ValueError: bad.tsv:2: label 'good' is not an integer
    """
    rows: list[tuple[str, int]] = []
    records = _records(path, "data", tsv=True)
    header = next(records, None)
    if header is None or len(header[1]) < 2:
        raise ValueError(f"{path}: expected a header 'sentence<TAB>label'")
    for line_no, row in records:
        if len(row) < 2:
            raise ValueError(f"{path}:{line_no}: expected 2 tab-separated columns, got {len(row)}")
        try:
            rows.append((row[0], int(row[1])))
        except ValueError:
            raise ValueError(f"{path}:{line_no}: label {row[1]!r} is not an integer") from None
        if limit is not None and len(rows) >= limit:
            break
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def read_labelled_texts(path: str | os.PathLike[str], limit: int | None = None) -> tuple[list[str], list[int] | None]:
    """Texts from ``path`` (as :func:`read_texts`) and their labels when it is a TSV with integer labels, else None.

    Examples
    --------
    >>> from pathlib import Path
    >>> _ = Path("reviews.tsv").write_text("sentence\\tlabel\\na moving film\\t1\\na dull script\\t0\\n")
    >>> read_labelled_texts("reviews.tsv")
    (['a moving film', 'a dull script'], [1, 0])
    >>> _ = Path("texts.txt").write_text("a moving film\\na dull script\\n")
    >>> read_labelled_texts("texts.txt")
    (['a moving film', 'a dull script'], None)
    """
    if Path(path).suffix.lower() == ".tsv":
        try:
            rows = [(text, label) for text, label in read_tsv(path) if text.strip()][:limit]
        except ValueError:
            rows = []
        if rows:
            return [t for t, _ in rows], [y for _, y in rows]
    return read_texts(path, limit), None
