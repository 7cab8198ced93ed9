"""Atomic output folders: write into a temporary sibling, then rename into place."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path


def check_output(
    path: str | os.PathLike | None, force: bool, *, inputs: Sequence[str | os.PathLike | None] = ()
) -> None:
    """Check an output path early, before any work.

    Refuses ``.`` and ``..``, an output that equals an input, lies inside one or contains one
    (even with ``force``: replacing it would destroy the input), and an existing output
    unless ``force`` is set.
    """
    if path is None:
        return
    if Path(path).name in ("", ".", "..") or os.fspath(path).rstrip("/").endswith(("/.", "/..")):
        raise ValueError(f"output {os.fspath(path)!r} names the current or a parent folder; give a new folder")
    target = Path(path).resolve()
    for source in inputs:
        if source is None:
            continue
        given = Path(source).resolve()
        if target == given or target in given.parents or given in target.parents:
            relation = "is" if target == given else ("contains" if target in given.parents else "lies inside")
            raise ValueError(f"output {path} {relation} the input {source}; choose another output")
    if Path(path).exists() and not force:
        raise FileExistsError(f"{path} already exists; pass --force (force=True) to overwrite it")


@contextmanager
def atomic_dir(path: str | os.PathLike, *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder that becomes ``path`` when the body succeeds.

    An existing ``path`` is refused with ``FileExistsError`` unless ``force`` is set, in
    which case it is replaced only after the new folder is complete. On error the
    temporary folder is removed and ``path`` is left as it was.
    """
    check_output(path, force)
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / "x")
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def atomic_file(path: str | os.PathLike, *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary file path that is renamed to ``path`` when the body succeeds."""
    check_output(path, force)
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
