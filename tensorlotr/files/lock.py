"""One writer at a time: a lock file next to an output, held while the output is read, changed and replaced.

``write_lock("zoo")`` holds ``.zoo.lock``, next to ``zoo``, as git holds ``index.lock`` and
package managers their lock files. A second writer of the same output waits for the first,
up to ``timeout`` seconds (a :class:`LockWaitWarning` says whom it waits for), then fails
with a ``TimeoutError`` that names the output, the lock file and the writer's pid.

The lock is the kernel's (``flock``) on that file, so the lock of a writer that died (SIGKILL,
a power cut) is free at once: the next writer takes it over, and the file left behind is
removed by the next writer of the output (:func:`remove_stale_lock`). Where ``flock`` is
missing the file is created exclusively and holds the writer's pid; a lock whose writer no
longer runs is then stale and removed. The lock is re-entrant within a thread, and threads
of one process wait for each other.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

from .siblings import deferred_signals, pid_alive, sibling_stem

fcntl: ModuleType | None
try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

#: How long a writer waits for another writer of the same output, in seconds.
DEFAULT_TIMEOUT = 600.0
_POLL = 0.05
#: Never through a symbolic link: a link planted at the lock's name must not lead to truncating its target.
_OPEN = os.O_RDWR | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)


class LockWaitWarning(UserWarning):
    """A writer waits for another process that writes the same output.

    Examples
    --------
    >>> issubclass(LockWaitWarning, UserWarning)
    True
    """


def lock_path(target: str | os.PathLike[str]) -> Path:
    """The lock file of ``target``: the hidden sibling ``.NAME.lock``.

    Examples
    --------
    >>> print(lock_path("runs/my-zoo"))
    runs/.my-zoo.lock
    """
    path = Path(target)
    return path.parent / f".{sibling_stem(path)}.lock"


class _Entry:
    """This process's hold on one lock file: the threads' lock, how deep, and the open file."""

    def __init__(self) -> None:
        self.thread_lock = threading.RLock()
        self.depth = 0
        self.fd: int | None = None


_entries: dict[str, _Entry] = {}
_entries_guard = threading.Lock()


@contextmanager
def write_lock(target: str | os.PathLike[str], *, timeout: float = DEFAULT_TIMEOUT) -> Iterator[Path]:
    """Hold the lock of ``target`` (its sibling ``.NAME.lock``) while the block runs; yields the lock file.

    Waits up to ``timeout`` seconds for another writer, then raises ``TimeoutError``.

    Examples
    --------
    >>> from pathlib import Path
    >>> with write_lock("my-zoo") as lock:
    ...     with write_lock("my-zoo"):  # re-entrant
    ...         print(lock.name, lock.exists())
    .my-zoo.lock True
    >>> Path(".my-zoo.lock").exists()  # removed on release
    False
    """
    lock = lock_path(target)
    key = os.path.join(os.path.realpath(lock.parent), lock.name)
    with _entries_guard:
        entry = _entries.setdefault(key, _Entry())
    if not entry.thread_lock.acquire(timeout=max(timeout, 0.0)):
        raise TimeoutError(f"{target} is being written by another thread of this process; waited {timeout:g} s")
    outer = entry.depth == 0
    try:
        if outer:
            _acquire(entry, lock, target, timeout)
        entry.depth += 1
        yield lock
    finally:
        if outer:  # released whenever it was taken, even by a signal right after
            entry.depth = 0
            _release(entry, lock)
        else:
            entry.depth -= 1
        entry.thread_lock.release()


def _acquire(entry: _Entry, lock: Path, target: str | os.PathLike[str], timeout: float) -> None:
    """Take the lock file, waiting for its holder; ``entry.fd`` is set the moment it is held."""
    deadline = time.monotonic() + timeout
    warned = False
    while True:
        with deferred_signals():  # no open file or new lock file lost to a signal
            if fcntl is not None:
                _try_flock(entry, lock)
            else:
                _try_exclusive(entry, lock)
        if entry.fd is not None:
            return
        holder = _holder(lock)
        if time.monotonic() >= deadline:
            raise TimeoutError(
                f"{target} is being written by another process ({holder}, lock file {lock}); waited {timeout:g} s"
            )
        if not warned:
            warnings.warn(f"waiting for {holder}, which is writing {target} (lock file {lock})", LockWaitWarning, 4)
            warned = True
        time.sleep(_POLL)


def _try_flock(entry: _Entry, lock: Path) -> None:
    assert fcntl is not None
    _refuse_link(lock)
    fd = os.open(lock, _OPEN | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return
    if not _same_file(fd, lock):  # its last holder removed it meanwhile: try the new one
        os.close(fd)
        return
    entry.fd = fd
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())


def _try_exclusive(entry: _Entry, lock: Path) -> None:
    for _ in range(2):  # a dead writer's lock is removed, then created anew at once
        try:
            fd = os.open(lock, _OPEN | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            pid = _pid_in(lock)
            if pid is None or pid_alive(pid):
                return
            _remove_stale_exclusive(lock, pid)
            continue
        entry.fd = fd
        os.write(fd, f"{os.getpid()}\n".encode())
        return


def _remove_stale_exclusive(lock: Path, pid: int) -> None:
    """Remove the lock file of a dead writer ``pid``, and only it (renamed aside first, then checked)."""
    aside = lock.with_name(f"{lock.name}.stale-{os.getpid()}")
    try:
        os.rename(lock, aside)
    except OSError:
        return
    if _pid_in(aside) == pid:
        aside.unlink(missing_ok=True)
    else:  # a live writer's lock, taken meanwhile: put it back
        with contextlib.suppress(OSError):
            os.rename(aside, lock)


def _release(entry: _Entry, lock: Path) -> None:
    with deferred_signals():
        fd, entry.fd = entry.fd, None
        if fd is None:
            return
        with contextlib.suppress(OSError):
            if _same_file(fd, lock):
                lock.unlink()
        os.close(fd)


def _refuse_link(lock: Path) -> None:
    if lock.is_symlink():
        raise FileExistsError(f"{lock} is a symbolic link, not a lock file; remove it")


def _same_file(fd: int, path: Path) -> bool:
    try:
        here, there = os.fstat(fd), os.lstat(path)
    except OSError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _pid_in(lock: Path) -> int | None:
    try:
        text = lock.read_text(encoding="ascii", errors="replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _holder(lock: Path) -> str:
    pid = _pid_in(lock)
    return f"pid {pid}" if pid is not None else "another writer"


def remove_stale_lock(target: str | os.PathLike[str]) -> str | None:
    """Remove ``target``'s lock file when no writer holds it (one was killed); returns what was done, or None.

    Examples
    --------
    A writer killed while it held the lock of ``result`` left ``.result.lock`` behind:

    >>> from pathlib import Path
    >>> _ = Path(".result.lock").write_text("999999999\\n")
    >>> remove_stale_lock("result")
    'removed .result.lock, left by an interrupted run'
    >>> Path(".result.lock").exists(), remove_stale_lock("result")
    (False, None)
    """
    lock = lock_path(target)
    if not os.path.lexists(lock):
        return None
    if lock.is_symlink():  # not a lock file of ours: the link goes, what it points to stays
        lock.unlink()
        return f"removed {lock}, a symbolic link where the lock file goes"
    with deferred_signals():
        if fcntl is None:
            pid = _pid_in(lock)
            if pid is None or pid_alive(pid):
                return None
            _remove_stale_exclusive(lock, pid)
        else:
            try:
                fd = os.open(lock, _OPEN)
            except OSError:
                return None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # held: a writer is at work
                os.close(fd)
                return None
            try:
                if not _same_file(fd, lock):
                    return None
                lock.unlink()
            except OSError:
                return None
            finally:
                os.close(fd)
    return f"removed {lock}, left by an interrupted run"
