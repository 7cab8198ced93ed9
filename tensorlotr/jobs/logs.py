"""A tree of TensorBoard runs into one DataFrame (and one zstd parquet file), on tbparse.

Sweeps leave ``<dataset>/<model>/<method>/<param>/…/<seed>/events.out.tfevents.*``. Each
folder holding event files is a run; its path below ``log_dir`` gives typed columns.

Depth: a run deeper than ``names`` gets extra columns ``segment_<k>`` (k counts from 0
over all segments); a shallower run has missing values (NA) in its trailing named columns.

Distinct runs stay distinct: a segment column is typed (int or float) only when no two of
its segments read as the same number (``seed/07`` and ``seed/7``, ``lr/1e-4`` and
``lr/0.0001``); otherwise it stays text, with a :class:`SegmentTypeWarning`. Each run, tag
and step gives one row, as TensorBoard shows it: events are taken in the order they were
written (event files in name order, which starts with their creation time, then wall time)
and an event at step ``s`` replaces every earlier one of its run and tag at a step ``>= s``
(a resumed run overwrites the steps it logs again).
"""

from __future__ import annotations

import math
import os
import re
import struct
import warnings
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..progress import Progress, no_progress
from ..report import Result

EVENT_GLOB = "*tfevents*"
#: Names that ``names`` may not take: the output's own columns, and ``run``.
RESERVED_COLUMNS = ("tag", "step", "value", "wall_time", "run")


class EventFileWarning(UserWarning):
    """An event file is corrupt or truncated; what could be read was kept.

    Examples
    --------
    ``runs/`` holds three TensorBoard runs, ``runs/sst2/lotr/<lr>/<seed>/``, each logging
    ``train/loss`` at steps 0 to 4. Cut the last one short, as a killed run leaves it:

    >>> import shutil
    >>> import warnings
    >>> _ = shutil.copytree("runs", "killed-runs")
    >>> last = find_event_files("killed-runs")[-1]
    >>> _ = last.write_bytes(last.read_bytes()[:-3])
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     frame = read_logs("killed-runs")
    >>> [str(w.message) for w in caught if w.category is EventFileWarning]
    ['killed-runs/sst2/lotr/3e-4/0/events.out.tfevents...: record at byte ... (kept what could be read)']
    >>> len(frame)  # 3 runs x 5 steps, less the cut record
    14
    """


class SegmentTypeWarning(UserWarning):
    """A segment column stays text: two of its segments read as the same number.

    Examples
    --------
    Two runs, ``seeds/07/`` and ``seeds/7/``: as integers both would be 7, one run. The column
    stays text and both runs keep their rows:

    >>> import warnings
    >>> from torch.utils.tensorboard import SummaryWriter
    >>> for seed in ("07", "7"):
    ...     with SummaryWriter(f"seeds/{seed}") as writer:
    ...         writer.add_scalar("loss", 1.0, 0)
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     frame = read_logs("seeds", names=["seed"])
    >>> [str(w.message) for w in caught if w.category is SegmentTypeWarning]
    ["segment column 'seed': '07' and '7' read as the same number; the column is kept as text"]
    >>> sorted(frame.index.get_level_values("seed").unique())
    ['07', '7']
    """


def check_event_file(path: Path) -> str | None:
    """A description of what is wrong with the TFRecord framing of ``path``, or None.

    Each record is ``uint64 length, uint32 crc, data[length], uint32 crc``; a file that
    does not end on a record boundary is truncated or corrupt. (The CRCs are not checked.)

    Examples
    --------
    ``runs/`` holds three TensorBoard runs, each with one event file:

    >>> from pathlib import Path
    >>> path = find_event_files("runs")[0]
    >>> check_event_file(path) is None
    True
    >>> cut = Path("cut.tfevents")
    >>> _ = cut.write_bytes(path.read_bytes()[:-3])  # the last record loses its last 3 bytes
    >>> check_event_file(cut)
    'record at byte ... claims ... bytes, past the end of the file (... bytes)'
    """
    size = path.stat().st_size
    if size == 0:
        return "empty file"
    offset = 0
    with open(path, "rb") as handle:
        while offset < size:
            header = handle.read(12)
            if len(header) < 12:
                return f"truncated record header at byte {offset}"
            (length,) = struct.unpack("<Q", header[:8])
            end = offset + 12 + length + 4
            if end > size:
                return f"record at byte {offset} claims {length} bytes, past the end of the file ({size} bytes)"
            handle.seek(end)
            offset = end
    return None


def _read_file(path: str) -> tuple[pd.DataFrame, str | None]:
    """Scalars of one event file (``step``, ``tag``, ``value``, ``wall_time``) and a problem, if any."""
    from tbparse import SummaryReader

    problem = check_event_file(Path(path))
    extra = {"wall_time"}  # the order the events were written in
    try:
        with warnings.catch_warnings():  # tbparse's own pandas deprecation notices are not the user's concern
            warnings.filterwarnings("ignore", message="The inplace keyword")
            reader = SummaryReader(path, extra_columns=extra, event_types={"scalars", "tensors"})
            frames = [reader.scalars]
            tensors = reader.tensors
    except Exception as exc:  # tbparse/tensorboard raise many kinds on bad input
        return pd.DataFrame(), problem or f"unreadable: {exc}"
    if len(tensors):  # scalars logged as tensors (tf.summary.scalar in TF2) count as scalars
        scalar = tensors["value"].map(lambda v: np.ndim(v) == 0)
        if scalar.any():
            t = tensors[scalar].copy()
            t["value"] = t["value"].map(float)
            frames.append(t)
    frames = [f for f in frames if len(f)]
    frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    if frame.empty and problem is None:
        problem = "no scalars in a file that is not empty" if Path(path).stat().st_size > 100 else None
    return frame, problem


_INT = re.compile(r"[+-]?[0-9]+")
_FLOAT = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")
_INT64 = (-(2**63), 2**63 - 1)


def _typed(values: pd.Series, column: str) -> pd.Series:
    """Path segments as int (nullable Int64 where runs lack the level), float (the double
    nearest the written decimal, e.g. 1e-05) or category; text whenever typing would give two
    distinct segments one value (a :class:`SegmentTypeWarning` names them)."""
    present = values.dropna()
    texts = sorted(set(present))
    if not texts:
        return values.astype("category")
    numbers: dict[str, float | int] | None = None
    if all(_INT.fullmatch(t) for t in texts) and all(_INT64[0] <= int(t) <= _INT64[1] for t in texts):
        numbers = {t: int(t) for t in texts}
    elif all(_FLOAT.fullmatch(t) for t in texts) and all(math.isfinite(float(t)) for t in texts):
        numbers = {t: float(t) for t in texts}
    if numbers is None:
        return values.astype("category")
    seen: dict[float | int, str] = {}
    for text, number in numbers.items():
        if number in seen:
            warnings.warn(
                f"segment column {column!r}: {seen[number]!r} and {text!r} read as the same number; "
                "the column is kept as text",
                SegmentTypeWarning,
                stacklevel=5,
            )
            return values.astype("category")
        seen[number] = text
    if all(isinstance(n, int) for n in numbers.values()):
        # plain int64 when every run has the segment (it survives parquet as an index level)
        typed = values.map(lambda s: numbers[s] if isinstance(s, str) else None)
        return typed.astype("int64" if values.notna().all() else "Int64")
    return values.map(lambda s: float(numbers[s]) if isinstance(s, str) else np.nan).astype("float64")


@dataclass(kw_only=True)
class LogsSummary(Result):
    """What :func:`tb2parquet` read and wrote.

    ``rows`` counts the scalars (one per run, tag and step); ``ratio`` is the event files'
    size over the parquet file's.

    Examples
    --------
    ``runs/`` holds three TensorBoard runs, ``runs/sst2/lotr/<lr>/<seed>/``, each logging
    ``train/loss`` at steps 0 to 4:

    >>> summary = tb2parquet("runs", "summary.parquet", names=["dataset", "method", "lr", "seed"])
    >>> summary.runs, summary.event_files, summary.tags, summary.rows
    (3, 3, 1, 15)
    >>> print(summary)
    wrote summary.parquet: 3 runs, 3 event files, 1 tags, 15 rows; ... MiB of events -> ... MiB parquet (...x smaller)
    >>> summary["ratio"] == summary.input_bytes / summary.output_bytes  # to_dict() adds the ratio
    True
    """

    output: str
    runs: int
    event_files: int
    tags: int
    rows: int
    input_bytes: int
    output_bytes: int
    problems: list[str]

    @property
    def ratio(self) -> float:
        return self.input_bytes / max(self.output_bytes, 1)

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "ratio": self.ratio}

    def text(self) -> str:
        return (
            f"wrote {self.output}: {self.runs} runs, {self.event_files} event files, {self.tags} tags, "
            f"{self.rows:,} rows; {self.input_bytes / 2**20:.1f} MiB of events -> "
            f"{self.output_bytes / 2**20:.2f} MiB parquet ({self.ratio:.0f}x smaller)"
            + (f"; {len(self.problems)} problem file(s)" if self.problems else "")
        )


def find_event_files(log_dir: str | os.PathLike[str]) -> list[Path]:
    """Event files below ``log_dir``, sorted; errors name an empty or missing folder.

    Examples
    --------
    ``runs/`` holds three TensorBoard runs, ``runs/sst2/lotr/<lr>/<seed>/``:

    >>> [str(path.parent) for path in find_event_files("runs")]
    ['runs/sst2/lotr/1e-4/0', 'runs/sst2/lotr/1e-4/1', 'runs/sst2/lotr/3e-4/0']
    >>> find_event_files("no-runs")
    Traceback (most recent call last):
    FileNotFoundError: log folder no-runs does not exist
    """
    root = Path(log_dir)
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(f"log folder {root} is a file, not a folder of runs")
    if not root.is_dir():
        raise FileNotFoundError(f"log folder {root} does not exist")
    files = sorted(p for p in root.rglob(EVENT_GLOB) if p.is_file())
    if not files:
        raise ValueError(f"{root} holds no TensorBoard event files ({EVENT_GLOB})")
    return files


def read_logs(
    log_dir: str | os.PathLike[str],
    names: Sequence[str] | None = None,
    tags: str | None = None,
    index: Sequence[str] | None = None,
    *,
    wall_time: bool = False,
    jobs: int = 1,
    strict: bool = False,
    progress: Progress | None = None,
) -> pd.DataFrame:
    """Every scalar under ``log_dir`` as one DataFrame.

    Parameters
    ----------
    log_dir : path
        The root of the tree; every folder holding event files is a run.
    names : sequence of str, optional
        Column names for the path segments below ``log_dir``, outermost first. Extra
        segments get ``segment_<k>``; missing ones are NA. They must be unique and not in
        :data:`RESERVED_COLUMNS` (``ValueError`` otherwise, before anything is read).
    tags : str, optional
        A regular expression; only tags it matches (``re.search``) are kept.
    index : sequence of str, optional
        Index columns. Default: the segment columns, then ``tag`` and ``step``, with a
        ``seed`` column last.
    wall_time : bool
        Keep the ``wall_time`` column.
    jobs : int
        Processes reading event files in parallel.
    strict : bool
        Raise on a corrupt or truncated event file instead of warning.

    Returns
    -------
    pandas.DataFrame
        Columns ``value`` (float32 when every value is a float32, as SummaryWriter writes
        them; float64 otherwise) and ``wall_time`` if asked; the index as above. Segment
        columns are int, float or category; ``tag`` is a category, ``step`` int64.
        One row per run, tag and step.

    Examples
    --------
    ``runs/`` holds three TensorBoard runs, ``runs/sst2/lotr/<lr>/<seed>/`` for lr 1e-4
    (seeds 0 and 1) and 3e-4 (seed 0), each logging ``train/loss`` = 1 / (step + 1) at steps 0
    to 4: 3 x 5 = 15 rows.

    >>> frame = read_logs("runs", names=["dataset", "method", "lr", "seed"])
    >>> frame.shape, list(frame.index.names), frame["value"].dtype
    ((15, 1), ['dataset', 'method', 'lr', 'tag', 'step', 'seed'], dtype('float32'))
    >>> frame.index.get_level_values("lr").unique().tolist()  # typed from the path: floats
    [0.0001, 0.0003]
    >>> frame.xs(("train/loss", 4), level=("tag", "step"))["value"]
    dataset  method  lr      seed
    sst2     lotr    0.0001  0       0.2
                             1       0.2
                     0.0003  0       0.2
    Name: value, dtype: float32
    >>> list(read_logs("runs", names=["dataset", "method"]).index.names)  # unnamed segments
    ['dataset', 'method', 'segment_2', 'segment_3', 'tag', 'step']
    """
    return _read_tree(Path(log_dir), names, tags, index, wall_time, jobs, strict, progress)[0]


def check_arguments(names: Sequence[str] | None, tags: str | None, index: Sequence[str] | None, jobs: int = 1) -> None:
    """Raise ``ValueError`` naming the value at fault, before any file is read.

    ``names`` must be non-empty strings, unique, not one of :data:`RESERVED_COLUMNS` and not
    ``segment_<k>`` for another position ``k`` (the name an unnamed segment gets); ``tags``
    must be a valid regular expression; ``index`` may not repeat a column; ``jobs`` is a
    positive integer.

    Examples
    --------
    >>> check_arguments(["dataset", "method", "lr", "seed"], r"loss$", None)  # fine: returns None
    >>> check_arguments(["dataset", "step"], None, None)
    Traceback (most recent call last):
    ValueError: names ['step'] clash with the output's own columns ['tag', 'step', 'value', 'wall_time', 'run']
    >>> check_arguments(None, "loss(", None)
    Traceback (most recent call last):
    ValueError: tags 'loss(' is not a valid regular expression: missing ), ...
    >>> check_arguments(None, None, None, jobs=0)
    Traceback (most recent call last):
    ValueError: jobs must be a positive integer (reader processes), got 0
    """
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be a positive integer (reader processes), got {jobs!r}")
    if names is not None:
        if isinstance(names, str) or not all(isinstance(n, str) and n for n in names):
            raise ValueError(f"names must be a list of non-empty strings, got {names!r}")
        repeated = sorted({n for n in names if list(names).count(n) > 1})
        if repeated:
            raise ValueError(f"names must be unique; repeated: {repeated}")
        reserved = sorted(set(names) & set(RESERVED_COLUMNS))
        if reserved:
            raise ValueError(f"names {reserved} clash with the output's own columns {list(RESERVED_COLUMNS)}")
        clashing = [n for k, n in enumerate(names) if re.fullmatch(r"segment_\d+", n) and n != f"segment_{k}"]
        if clashing:
            raise ValueError(f"names {clashing} clash with the segment_<k> columns of unnamed path segments")
    if tags is not None:
        if not isinstance(tags, str):
            raise ValueError(f"tags must be a regular expression (a string), got {tags!r}")
        try:
            re.compile(tags)
        except re.error as exc:
            raise ValueError(f"tags {tags!r} is not a valid regular expression: {exc}") from None
    if index is not None:
        if isinstance(index, str) or not all(isinstance(c, str) for c in index):
            raise ValueError(f"index must be a list of column names, got {index!r}")
        repeated = sorted({c for c in index if list(index).count(c) > 1})
        if repeated:
            raise ValueError(f"index columns must be unique; repeated: {repeated}")


def _read_tree(
    root: Path,
    names: Sequence[str] | None,
    tags: str | None,
    index: Sequence[str] | None,
    wall_time: bool,
    jobs: int,
    strict: bool,
    progress: Progress | None,
) -> tuple[pd.DataFrame, list[Path], list[str]]:
    """:func:`read_logs`, also returning the event files read and the problems found."""
    check_arguments(names, tags, index, jobs)
    files = find_event_files(root)
    progress = progress or no_progress
    problems: list[str] = []
    if jobs > 1:
        with ProcessPoolExecutor(max_workers=min(jobs, len(files))) as pool:
            results = list(progress(pool.map(_read_file, map(str, files), chunksize=4), "event files", len(files)))
    else:
        results = [_read_file(str(f)) for f in progress(files, "event files", len(files))]
    frames = []
    pattern = re.compile(tags) if tags else None
    found_tags: set[str] = set()
    for order, (path, (frame, problem)) in enumerate(zip(files, results, strict=True)):
        if problem is not None:
            message = f"{path}: {problem}"
            if strict:
                raise ValueError(message)
            problems.append(message)
            warnings.warn(message + " (kept what could be read)", EventFileWarning, stacklevel=3)
        if frame.empty:
            continue
        if pattern is not None:
            found_tags.update(frame["tag"].unique())
            frame = frame[frame["tag"].map(lambda t: pattern.search(t) is not None)]
            if frame.empty:
                continue
        frame = frame.assign(_run=str(path.parent.relative_to(root)), _file=order)
        frames.append(frame)
    if not frames:
        raise ValueError(_no_scalars(root, tags, found_tags, problems, len(files)))
    data = _as_shown(pd.concat(frames, ignore_index=True))
    segment_columns = _segment_columns(data, names or [])
    data = data.drop(columns=["_run", "_file"] + ([] if wall_time else ["wall_time"]))
    value = data["value"].to_numpy(dtype=np.float64)
    as_float32 = value.astype(np.float32)
    data["value"] = as_float32 if np.array_equal(as_float32.astype(np.float64), value, equal_nan=True) else value
    data["tag"] = data["tag"].astype("category")
    data["step"] = data["step"].astype("int64")
    data = pd.concat([segment_columns, data], axis=1)
    if index is None:
        seg = [c for c in segment_columns.columns if c != "seed"]
        index = [*seg, "tag", "step", *(["seed"] if "seed" in segment_columns.columns else [])]
    unknown = [c for c in index if c not in data.columns]
    if unknown:
        raise ValueError(f"index columns {unknown} are not among {list(data.columns)}")
    return data.set_index(list(index)).sort_index(), files, problems


def _no_scalars(root: Path, tags: str | None, found: set[str], problems: list[str], n_files: int) -> str:
    """The error for a tree that gives no rows: naming the tags there are, or the files that failed."""
    if tags is not None and found:
        listing = ", ".join(sorted(found)[:8]) + (", …" if len(found) > 8 else "")
        return f"no tags under {root} match {tags!r}; the tags there: {listing}"
    if problems and len(problems) == n_files:
        return f"no scalars under {root}: every event file is unreadable, e.g. " + "; ".join(problems[:3])
    return f"no scalars under {root}" + (f" match tags {tags!r}" if tags else "")


def _as_shown(data: pd.DataFrame) -> pd.DataFrame:
    """One row per run, tag and step, as TensorBoard shows them.

    Events are put in the order they were written (event file, then wall time); an event at
    step ``s`` preempts every earlier event of its run and tag at a step ``>= s``, as
    TensorBoard's reservoirs do, so a resumed run's steps replace the old ones.
    """
    data = data.sort_values(["_file", "wall_time"], kind="stable", ignore_index=True)
    backwards = data.iloc[::-1]
    keys = [backwards["_run"], backwards["tag"]]
    suffix_min = backwards.groupby(keys, sort=False)["step"].cummin()  # over this event and the later ones
    later_min = suffix_min.groupby(keys, sort=False).shift(1).reindex(data.index)  # over the later ones only
    keep = later_min.isna() | (data["step"] < later_min)  # every later event of its series has a larger step
    return data[keep.to_numpy()].reset_index(drop=True)


def _segment_columns(data: pd.DataFrame, names: Sequence[str]) -> pd.DataFrame:
    """Typed segment columns: each run's path is split and typed once, then spread to its rows."""
    runs = data["_run"].astype("category")
    categories = list(runs.cat.categories)
    codes = runs.cat.codes.to_numpy()
    parts = [[] if run == "." else run.split(os.sep) for run in categories]
    depth = max([len(names), *(len(p) for p in parts)])
    columns = {}
    for k in range(depth):
        name = names[k] if k < len(names) else f"segment_{k}"
        per_run = _typed(pd.Series([p[k] if k < len(p) else None for p in parts], dtype=object), name)
        columns[name] = per_run.take(codes).reset_index(drop=True)
    return pd.DataFrame(columns, index=data.index)


def write_parquet(frame: pd.DataFrame, path: str | os.PathLike[str]) -> None:
    """zstd parquet; float columns byte-stream-split (smaller for curves), the others dictionary-coded.

    The index is stored with the data, so ``pandas.read_parquet`` gives the frame back.

    Examples
    --------
    >>> curve = pd.DataFrame({"step": [0, 1, 2], "value": [1.0, 0.5, 0.25]}).set_index("step")
    >>> write_parquet(curve, "curve.parquet")
    >>> pd.read_parquet("curve.parquet").equals(curve)
    True
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(frame)
    floats = [f.name for f in table.schema if pa.types.is_floating(f.type)]
    others = [f.name for f in table.schema if f.name not in floats]
    pq.write_table(
        table, str(path), compression="zstd", use_dictionary=others or False, use_byte_stream_split=floats or False
    )


def tb2parquet(
    log_dir: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    names: Sequence[str] | None = None,
    tags: str | None = None,
    index: Sequence[str] | None = None,
    *,
    wall_time: bool = False,
    jobs: int = 1,
    strict: bool = False,
    force: bool = False,
    progress: Progress | None = None,
) -> LogsSummary:
    """Read the tree with :func:`read_logs` and write one zstd parquet file, atomically.

    The arguments are :func:`read_logs`'s, with ``out_path`` the file to write (an existing
    one needs ``force``). Returns a :class:`LogsSummary`; ``pandas.read_parquet(out_path)``
    gives :func:`read_logs`'s frame.

    Examples
    --------
    ``runs/`` holds three TensorBoard runs, ``runs/sst2/lotr/<lr>/<seed>/``, each logging
    ``train/loss`` at steps 0 to 4:

    >>> import pandas as pd
    >>> names = ["dataset", "method", "lr", "seed"]
    >>> summary = tb2parquet("runs", "logs.parquet", names=names)
    >>> summary.runs, summary.rows
    (3, 15)
    >>> pd.read_parquet("logs.parquet").equals(read_logs("runs", names=names))
    True
    """
    from ..files.atomic import atomic_file, check_output

    check_arguments(names, tags, index, jobs)
    check_output(out_path, force, inputs=[log_dir])
    frame, files, problems = _read_tree(Path(log_dir), names, tags, index, wall_time, jobs, strict, progress)
    with atomic_file(out_path, force=force) as tmp:
        write_parquet(frame, tmp)
    return LogsSummary(
        output=str(out_path),
        runs=len({f.parent for f in files}),
        event_files=len(files),
        tags=int(frame.index.get_level_values("tag").nunique()) if "tag" in frame.index.names else 0,
        rows=len(frame),
        input_bytes=sum(f.stat().st_size for f in files),
        output_bytes=Path(out_path).stat().st_size,
        problems=problems,
    )
