"""Atomic output folders: write into a temporary sibling, then rename into place."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def check_output(path: str | os.PathLike | None, force: bool) -> None:
    """Raise ``FileExistsError`` early, before any work, if ``path`` exists and ``force`` is off."""
    if path is not None and Path(path).exists() and not force:
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
