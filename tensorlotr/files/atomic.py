"""Atomic outputs: write into a temporary sibling, then swap it into place.

A new output ``OUT`` is written into ``.OUT.tmp-<pid>-<random>`` next to it and renamed into
place when complete. An existing ``OUT`` (with ``force``) is replaced in one step by Linux's
``renameat2(RENAME_EXCHANGE)``, so at every instant ``OUT`` is either the complete old
output or the complete new one. Where the exchange is not available (another system, a
file system without it) the old output is first renamed to ``.OUT.old-<pid>-<random>``
and the new one renamed into place; a crash between the two renames leaves ``OUT``
missing and the complete old output in that sibling.

Leftovers of a run that was killed (SIGKILL, a power cut) are found by the next run that
writes ``OUT``, from the ``<pid>`` in their names: a missing ``OUT`` is restored from its
``.old`` sibling, other leftovers are removed, and a :class:`LeftoverWarning` says so.
Leftovers of a writer that is still running are left alone.

Outputs honour the umask, as ``cp`` and ``save_pretrained`` do (``mkstemp`` and
``mkdtemp`` would leave them 0600 and 0700).
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import platform
import re
import secrets
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
#: renameat2's system call number where the C library lacks a wrapper (glibc < 2.28).
_SYS_RENAMEAT2 = {"x86_64": 316, "aarch64": 276}


class LeftoverWarning(UserWarning):
    """A run found, and restored or removed, what an interrupted run left next to its output.

    Examples
    --------
    A killed writer (pid 999999999, no longer running) left its temporary folder next to
    ``my-lotr``:

    >>> import warnings
    >>> from pathlib import Path
    >>> Path(".my-lotr.tmp-999999999-abcd1234").mkdir()
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     _ = recover_leftovers("my-lotr")
    >>> [(w.category.__name__, str(w.message)) for w in caught]
    [('LeftoverWarning', 'removed .my-lotr.tmp-999999999-abcd1234, left by an interrupted run')]
    """


def check_output(
    path: str | os.PathLike[str] | None, force: bool, *, inputs: Sequence[str | os.PathLike[str] | None] = ()
) -> None:
    """Check an output path early, before any work.

    Refuses ``.`` and ``..``, an output that equals an input, lies inside one or contains one
    (even with ``force``: replacing it would destroy the input), and an existing output
    unless ``force`` is set. Leftovers of an interrupted run that wrote ``path`` are
    recovered first (:func:`recover_leftovers`), so a restored output counts as existing.

    Examples
    --------
    >>> from pathlib import Path
    >>> Path("my-lotr").mkdir()
    >>> check_output("new-lotr", force=False)  # nothing there: fine
    >>> check_output("my-lotr", force=False)
    Traceback (most recent call last):
    FileExistsError: my-lotr already exists; pass --force (force=True) to overwrite it
    >>> check_output("my-lotr/out", force=True, inputs=["my-lotr"])
    Traceback (most recent call last):
    ValueError: output my-lotr/out lies inside the input my-lotr; choose another output
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
    recover_leftovers(path)
    if os.path.lexists(path) and not force:
        raise FileExistsError(f"{path} already exists; pass --force (force=True) to overwrite it")


# --- leftovers of interrupted runs ---------------------------------------------------------


def _sibling_prefix(target: Path, kind: str) -> str:
    """``.NAME.tmp-<pid>-`` or ``.NAME.old-<pid>-``: what the next run matches to find leftovers."""
    return f".{target.name}.{kind}-{os.getpid()}-"


def _leftovers(target: Path) -> list[tuple[Path, str, bool]]:
    """``(path, kind, legacy)`` of the temporary siblings of ``target`` whose writer is gone.

    ``kind`` is ``"tmp"`` or ``"old"``; ``legacy`` marks a name without a pid, from an older
    version, which kept the old output at ``.NAME.old-*/x``.
    """
    pattern = re.compile(re.escape(f".{target.name}.") + r"(tmp|old)-(?:(\d+)-)?[a-z0-9_]{8}")
    try:
        entries = list(target.parent.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []
    found = []
    for entry in sorted(entries):
        match = pattern.fullmatch(entry.name)
        if match is not None and not _alive(match.group(2)):
            found.append((entry, match.group(1), match.group(2) is None))
    return found


def _alive(pid: str | None) -> bool:
    """Whether the writer ``pid`` still runs (no pid: a name from an older version, whose writer is gone)."""
    if pid is None:
        return False
    if int(pid) == os.getpid():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    except OverflowError:
        return False
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def recover_leftovers(path: str | os.PathLike[str]) -> list[str]:
    """Restore or remove what interrupted runs left next to ``path``; returns (and warns) what was done.

    When ``path`` is missing and an interrupted replacement left the complete old output in
    ``.NAME.old-*``, that is renamed back to ``path``; every other leftover of a writer that
    is no longer running is removed.

    Examples
    --------
    A writer (pid 999999999, no longer running) was killed between moving the old ``result``
    aside and renaming the new one into place:

    >>> import warnings
    >>> from pathlib import Path
    >>> Path(".result.old-999999999-abcd1234").mkdir()
    >>> with warnings.catch_warnings():
    ...     warnings.simplefilter("ignore", LeftoverWarning)
    ...     recover_leftovers("result")
    ['restored result from .result.old-999999999-abcd1234, left by an interrupted run']
    >>> Path("result").is_dir(), recover_leftovers("result")
    (True, [])
    """
    target = Path(path)
    done = []
    for leftover, kind, legacy in _leftovers(target):
        payload = leftover / "x" if legacy and kind == "old" else leftover
        if kind == "old" and not os.path.lexists(target) and os.path.lexists(payload):
            os.rename(payload, target)
            done.append(f"restored {target} from {leftover.name}, left by an interrupted run")
        else:
            done.append(f"removed {leftover}, left by an interrupted run")
        _remove(leftover)
    for message in done:
        warnings.warn(message, LeftoverWarning, stacklevel=3)
    return done


# --- modes and the swap ------------------------------------------------------------------


def _umask() -> int:
    """The process umask, read without changing it where /proc allows."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@functools.cache
def _renameat2() -> Callable[[bytes, bytes, int], int] | None:
    """``renameat2(AT_FDCWD, a, AT_FDCWD, b, flags)`` through the C library, or None off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    function = getattr(libc, "renameat2", None)
    if function is not None:
        function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        function.restype = ctypes.c_int
        return lambda a, b, flags: function(_AT_FDCWD, a, _AT_FDCWD, b, flags)
    number = _SYS_RENAMEAT2.get(platform.machine())
    if number is None:
        return None
    syscall = libc.syscall
    syscall.restype = ctypes.c_long
    fd = ctypes.c_int(_AT_FDCWD)
    return lambda a, b, flags: syscall(ctypes.c_long(number), fd, a, fd, b, ctypes.c_uint(flags))


def _exchange(first: Path, second: Path) -> bool:
    """Swap two existing paths in one step; False where the system or file system cannot."""
    function = _renameat2()
    if function is None:
        return False
    if function(os.fsencode(first), os.fsencode(second), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), os.fspath(first), None, os.fspath(second))


def _swap_in(tmp: Path, target: Path) -> None:
    """Put the complete ``tmp`` at ``target``, replacing what is there; ``tmp`` is gone after."""
    if not os.path.lexists(target):
        os.rename(tmp, target)
        return
    if _exchange(tmp, target):
        _remove(tmp)  # now the old output
        return
    old = target.with_name(_sibling_prefix(target, "old") + secrets.token_hex(4))
    try:
        os.rename(target, old)
        os.rename(tmp, target)
    except BaseException:  # an error or a signal between the two renames: put the old output back
        if not os.path.lexists(target) and os.path.lexists(old):
            os.rename(old, target)
        raise
    _remove(old)


def _temporary(target: Path, folder: bool) -> Path:
    """A new temporary folder or file next to ``target``; errors name ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    prefix = _sibling_prefix(target, "tmp")
    try:
        if folder:
            return Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
        handle, name = tempfile.mkstemp(prefix=prefix, dir=target.parent)
    except OSError as exc:
        raise type(exc)(exc.errno, f"cannot write {target}: {exc.strerror}", os.fspath(target.parent)) from None
    os.close(handle)
    return Path(name)


@contextmanager
def atomic_dir(path: str | os.PathLike[str], *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder that becomes ``path`` when the body succeeds.

    An existing ``path`` is refused with ``FileExistsError`` unless ``force`` is set, in
    which case it is replaced in one step once the new folder is complete (see the module
    notes). On any error, SIGTERM or Ctrl-C included, the temporary folder is removed and
    ``path`` is left as it was. The folder gets mode 0777 minus the umask.

    Examples
    --------
    >>> from pathlib import Path
    >>> with atomic_dir("out") as tmp:  # a hidden sibling .out.tmp-<pid>-<random> until the body succeeds
    ...     _ = (tmp / "a.txt").write_text("complete")
    ...     print(tmp.name.startswith(".out.tmp-"), Path("out").exists())
    True False
    >>> sorted(p.name for p in Path("out").iterdir())
    ['a.txt']
    >>> with atomic_dir("out", force=True) as tmp:
    ...     _ = (tmp / "b.txt").write_text("half")
    ...     raise RuntimeError("the job failed")
    Traceback (most recent call last):
    RuntimeError: the job failed
    >>> sorted(p.name for p in Path("out").iterdir()), [p.name for p in Path(".").glob(".out.*")]
    (['a.txt'], [])
    """
    check_output(path, force)
    target = Path(path)
    tmp = _temporary(target, folder=True)
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        _swap_in(tmp, target)
    except BaseException:
        _remove(tmp)
        raise


@contextmanager
def atomic_file(path: str | os.PathLike[str], *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary file path that is renamed to ``path`` when the body succeeds.

    The file gets mode 0666 minus the umask (set when the body is done: writers such as
    safetensors' ``save_file`` replace the file with a 0600 one); on any error it is removed.

    Examples
    --------
    >>> from pathlib import Path
    >>> with atomic_file("report.json") as tmp:
    ...     _ = tmp.write_text('{"rank": [8, 8]}')
    >>> Path("report.json").read_text()
    '{"rank": [8, 8]}'
    >>> with atomic_file("report.json"):
    ...     pass
    Traceback (most recent call last):
    FileExistsError: report.json already exists; pass --force (force=True) to overwrite it
    """
    check_output(path, force)
    target = Path(path)
    tmp = _temporary(target, folder=False)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
