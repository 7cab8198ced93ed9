"""Atomic outputs: write into a temporary sibling, then swap it into place.

A new output ``OUT`` is written into ``.OUT.tmp-<pid>-<random>`` next to it and renamed into
place when complete. An existing ``OUT`` (with ``force``) is replaced in one step by Linux's
``renameat2(RENAME_EXCHANGE)``, so at every instant ``OUT`` is either the complete old
output or the complete new one. Where the exchange is not available (another system, a
file system without it) the old output is first renamed to ``.OUT.old-<pid>-<random>``
and the new one renamed into place; a crash between the two renames leaves ``OUT``
missing and the complete old output in that sibling. A name too long for such a sibling
(the file-system limit is 255 bytes) is shortened in it (:mod:`tensorlotr.files.siblings`).

One writer at a time: the final swap runs under the output's lock (:mod:`tensorlotr.files.lock`),
and there the check that a new output does not exist yet is made again, and kept by the
rename itself (``RENAME_NOREPLACE``): of two runs writing one new ``OUT`` without ``force``,
exactly one succeeds and the other gets ``FileExistsError``. An existing folder updated in
place (:func:`atomic_update`, as ``zoo add`` does) keeps its other files.

Ctrl-C and SIGTERM never leave a sibling behind: the steps that make, swap and remove them
hold the signals until they are done (:func:`tensorlotr.files.siblings.deferred_signals`). A
signal during the swap thus takes effect once the new output is in place; :func:`written_outputs`
tells the command line so, and it reports success rather than an interrupted run.

Leftovers of a run that was killed (SIGKILL, a power cut) are found by the next run that
writes ``OUT``, from the ``<pid>`` in their names: a missing ``OUT`` is restored from its
``.old`` sibling, other leftovers (and a lock file no writer holds) are removed, and a
:class:`LeftoverWarning` says so. Leftovers of a writer that is still running are left alone.

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
import stat
import sys
import tempfile
import warnings
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from .lock import DEFAULT_TIMEOUT, remove_stale_lock, write_lock
from .siblings import deferred_signals, pid_alive, sibling_stem

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
#: renameat2's system call number where the C library lacks a wrapper (glibc < 2.28).
_SYS_RENAMEAT2 = {"x86_64": 316, "aarch64": 276}

#: The outputs this process has put in place, in order (absolute paths).
_written: list[str] = []


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
    The writers check again when they put the output in place.

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
    target = _resolved(path)
    for source in inputs:
        if source is None:
            continue
        given = _resolved(source)
        if target == given or target in given.parents or given in target.parents:
            relation = "is" if target == given else ("contains" if target in given.parents else "lies inside")
            raise ValueError(f"output {path} {relation} the input {source}; choose another output")
    for parent in Path(path).absolute().parents:  # the nearest that exists must be a folder
        if os.path.exists(parent):
            if not parent.is_dir():
                raise NotADirectoryError(f"{parent} is not a folder; {path} cannot be written inside it")
            break
    recover_leftovers(path)
    if os.path.lexists(path) and not force:
        raise FileExistsError(f"{path} already exists; pass --force (force=True) to overwrite it")


def _resolved(path: str | os.PathLike[str], strict: bool = False) -> Path:
    """``path`` with its symbolic links followed; a loop of links is a ``ValueError`` that names it."""
    try:
        return Path(path).resolve(strict=strict)
    except RuntimeError:  # Python < 3.13 reports a loop so
        raise ValueError(f"{os.fspath(path)} is a loop of symbolic links") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ValueError(f"{os.fspath(path)} is a loop of symbolic links") from None
        if isinstance(exc, FileNotFoundError):
            raise FileNotFoundError(f"{os.fspath(path)} does not exist") from None
        raise


def resolve_folder(path: str | os.PathLike[str]) -> Path:
    """The real folder ``path`` names, its symbolic links followed; errors name ``path``.

    Examples
    --------
    >>> from pathlib import Path
    >>> Path("real-zoo").mkdir()
    >>> Path("zoo-link").symlink_to("real-zoo")
    >>> resolve_folder("zoo-link").name
    'real-zoo'
    >>> Path("loop").symlink_to("loop")
    >>> resolve_folder("loop")
    Traceback (most recent call last):
    ValueError: loop is a loop of symbolic links
    """
    real = _resolved(path, strict=True)
    if not real.is_dir():
        raise NotADirectoryError(f"{os.fspath(path)} is not a folder")
    return real


def written_outputs() -> list[str]:
    """The outputs this process has put in place so far, in order, as absolute paths.

    The command line compares them with its outputs when a signal stops it: a command
    whose outputs are all in place has done its work.

    Examples
    --------
    >>> before = len(written_outputs())
    >>> with atomic_file("notes.txt") as tmp:
    ...     _ = tmp.write_text("done")
    >>> [Path(p).name for p in written_outputs()[before:]]
    ['notes.txt']
    """
    return list(_written)


# --- leftovers of interrupted runs ---------------------------------------------------------


def _sibling_prefix(target: Path, kind: str) -> str:
    """``.NAME.tmp-<pid>-`` or ``.NAME.old-<pid>-``: what the next run matches to find leftovers."""
    return f".{sibling_stem(target)}.{kind}-{os.getpid()}-"


def _leftovers(target: Path) -> list[tuple[Path, str, bool]]:
    """``(path, kind, legacy)`` of the temporary siblings of ``target`` whose writer is gone.

    ``kind`` is ``"tmp"`` or ``"old"``; ``legacy`` marks a name without a pid, from an older
    version, which kept the old output at ``.NAME.old-*/x``.
    """
    pattern = re.compile(re.escape(f".{sibling_stem(target)}.") + r"(tmp|old)-(?:(\d+)-)?[a-z0-9_]{8}")
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
    return pid is not None and pid_alive(int(pid))


def _remove(path: Path) -> OSError | None:
    """Remove a file or a whole tree, read-only folders in it included; returns the error if some is left."""
    try:
        if not (path.is_dir() and not path.is_symlink()):
            path.unlink(missing_ok=True)
            return None
        try:
            shutil.rmtree(path)
        except OSError:  # a folder without write permission (an old output of mode 0555, say)
            _make_removable(path)
            shutil.rmtree(path)
    except OSError as exc:
        return exc
    return None


def _make_removable(top: Path) -> None:
    """Give the owner rwx on every folder below ``top``, so that its entries can be removed."""
    stack = [os.fspath(top)]
    while stack:
        folder = stack.pop()
        try:
            mode = os.lstat(folder).st_mode
            if not stat.S_ISDIR(mode):
                continue
            if mode & stat.S_IRWXU != stat.S_IRWXU:
                os.chmod(folder, stat.S_IMODE(mode) | stat.S_IRWXU)
            with os.scandir(folder) as entries:
                stack.extend(e.path for e in entries if e.is_dir(follow_symlinks=False))
        except OSError:
            continue


def recover_leftovers(path: str | os.PathLike[str]) -> list[str]:
    """Restore or remove what interrupted runs left next to ``path``; returns (and warns) what was done.

    When ``path`` is missing and an interrupted replacement left the complete old output in
    ``.NAME.old-*``, that is renamed back to ``path``; every other leftover of a writer that
    is no longer running is removed, and so is a lock file that no writer holds.

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
        with deferred_signals():
            payload = leftover / "x" if legacy and kind == "old" else leftover
            if kind == "old" and not os.path.lexists(target) and os.path.lexists(payload):
                os.rename(payload, target)
                done.append(f"restored {target} from {leftover.name}, left by an interrupted run")
            else:
                done.append(f"removed {leftover}, left by an interrupted run")
            error = _remove(leftover)
        if error is not None:
            done[-1] = f"could not remove {leftover}, left by an interrupted run: {error.strerror or error}"
    stale = remove_stale_lock(target)
    if stale is not None:
        done.append(stale)
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


def _rename2(first: Path, second: Path, flags: int) -> bool:
    """``renameat2`` with ``flags``; False where the system or file system lacks it, other errors raised."""
    function = _renameat2()
    if function is None:
        return False
    if function(os.fsencode(first), os.fsencode(second), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), os.fspath(first), None, os.fspath(second))


def _exchange(first: Path, second: Path) -> bool:
    """Swap two existing paths in one step; False where the system or file system cannot."""
    return _rename2(first, second, _RENAME_EXCHANGE)


def _exists_error(target: Path) -> FileExistsError:
    return FileExistsError(
        f"{target} already exists (another run wrote it meanwhile); pass --force (force=True) to overwrite it"
    )


def _rename_new(tmp: Path, target: Path) -> None:
    """Rename ``tmp`` to ``target``, which must not exist, never replacing what appears there meanwhile."""
    try:
        if _rename2(tmp, target, _RENAME_NOREPLACE):
            return
    except FileExistsError:
        raise _exists_error(target) from None
    if tmp.is_dir():  # a rename onto a folder that is not empty fails
        os.rename(tmp, target)
        return
    try:  # a hard link is never made over an existing name
        os.link(tmp, target)
    except FileExistsError:
        raise _exists_error(target) from None
    except OSError:
        if os.path.lexists(target):
            raise _exists_error(target) from None
        os.rename(tmp, target)
        return
    tmp.unlink()


def _swap_in(tmp: Path, target: Path) -> None:
    """Put the complete ``tmp`` at ``target``, replacing what is there; ``tmp`` is gone after."""
    if not os.path.lexists(target):
        try:
            _rename_new(tmp, target)
            return
        except FileExistsError:  # appeared meanwhile: replace it, as asked
            pass
    if _exchange(tmp, target):
        _removed_old(tmp, target)  # tmp now holds the old output
        return
    old = target.with_name(_sibling_prefix(target, "old") + secrets.token_hex(4))
    try:
        os.rename(target, old)
        os.rename(tmp, target)
    except BaseException:  # an error between the two renames: put the old output back
        if not os.path.lexists(target) and os.path.lexists(old):
            os.rename(old, target)
        raise
    _removed_old(old, target)


def _removed_old(old: Path, target: Path) -> None:
    """Remove the replaced output ``old`` of ``target``; a warning says where it stays if it cannot go."""
    error = _remove(old)
    if error is not None:
        warnings.warn(
            f"{target} was replaced, but its old version could not be removed and stays in {old}: "
            f"{error.strerror or error}",
            LeftoverWarning,
            stacklevel=5,
        )


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
def _writing(
    target: Path,
    *,
    folder: bool,
    force: bool,
    mode: Callable[[], int],
    timeout: float,
    fill: Callable[[Path], None] | None = None,
) -> Iterator[Path]:
    """The temporary sibling of ``target``, swapped in (under the lock) when the body succeeds, else removed."""
    tmp: Path | None = None
    try:
        with deferred_signals():  # made and noted for the clean-up in one step
            tmp = _temporary(target, folder)
        if fill is not None:
            fill(tmp)
        yield tmp
        with write_lock(target, timeout=timeout), deferred_signals():
            if not force and os.path.lexists(target):
                raise _exists_error(target)
            os.chmod(tmp, mode())
            if not force:
                _rename_new(tmp, target)
            elif folder:
                _swap_in(tmp, target)
            else:
                os.replace(tmp, target)
            _written.append(os.path.join(os.path.realpath(target.parent), target.name))
    except BaseException:
        if tmp is not None:
            with deferred_signals():
                _remove(tmp)
        raise


@contextmanager
def atomic_dir(
    path: str | os.PathLike[str], *, force: bool = False, timeout: float = DEFAULT_TIMEOUT
) -> Iterator[Path]:
    """Yield a temporary folder that becomes ``path`` when the body succeeds.

    An existing ``path`` is refused with ``FileExistsError`` unless ``force`` is set, in
    which case it is replaced in one step once the new folder is complete (see the module
    notes); the check is made again at the final rename, under the output's lock (waited
    for up to ``timeout`` seconds). On any error, SIGTERM or Ctrl-C included, the temporary
    folder is removed and ``path`` is left as it was. The folder gets mode 0777 minus the umask.

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
    with _writing(Path(path), folder=True, force=force, mode=lambda: 0o777 & ~_umask(), timeout=timeout) as tmp:
        yield tmp


@contextmanager
def atomic_file(
    path: str | os.PathLike[str], *, force: bool = False, timeout: float = DEFAULT_TIMEOUT
) -> Iterator[Path]:
    """Yield a temporary file path that is renamed to ``path`` when the body succeeds.

    The file gets mode 0666 minus the umask (set when the body is done: writers such as
    safetensors' ``save_file`` replace the file with a 0600 one); on any error it is removed.
    Without ``force`` an existing ``path`` is refused, before the work and again at the rename.

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
    if Path(path).is_dir():
        raise FileExistsError(
            f"{path} is a folder; the output is a file, so choose another name (--force replaces files)"
        )
    with _writing(Path(path), folder=False, force=force, mode=lambda: 0o666 & ~_umask(), timeout=timeout) as tmp:
        yield tmp


@contextmanager
def atomic_update(
    path: str | os.PathLike[str], *, replaced: Collection[str] = (), timeout: float = DEFAULT_TIMEOUT
) -> Iterator[Path]:
    """Yield the new version of the existing folder ``path``, with its other files; it replaces the folder in one step.

    Symbolic links are followed: the real folder is updated, the links stay. Every entry of
    the folder but those named in ``replaced`` is carried into the new version (files as hard
    links, or copies where the file system refuses a link; folders and symbolic links as they
    are); the body writes the rest. The new version keeps the folder's mode; a folder this user
    cannot write is refused (``PermissionError``), as writing into it would be. The whole runs
    under the folder's lock (:func:`tensorlotr.files.lock.write_lock`); a caller that reads
    the folder before it changes it holds the lock from before the read. A pipe, socket or
    device in the folder is refused (``ValueError``): it cannot be carried.

    Examples
    --------
    >>> from pathlib import Path
    >>> with atomic_dir("shelf") as tmp:
    ...     _ = (tmp / "data.json").write_text("old")
    >>> _ = Path("shelf/NOTES.md").write_text("mine")  # a user's file
    >>> with atomic_update("shelf", replaced=["data.json"]) as tmp:
    ...     _ = (tmp / "data.json").write_text("new")
    >>> sorted((p.name, p.read_text()) for p in Path("shelf").iterdir())
    [('NOTES.md', 'mine'), ('data.json', 'new')]
    """
    target = resolve_folder(path)
    if not os.access(target, os.W_OK):  # a read-only folder is not updated behind its back
        bits = stat.S_IMODE(target.stat().st_mode)
        raise PermissionError(f"{path} is read-only (mode {bits:o}); make it writable to update it")
    skip = set(replaced)
    with write_lock(target, timeout=timeout):
        recover_leftovers(target)

        def fill(tmp: Path) -> None:
            for entry in sorted(target.iterdir()):
                if entry.name not in skip:
                    _carry(entry, tmp / entry.name, target)

        def mode() -> int:
            return stat.S_IMODE(os.stat(target).st_mode)

        with _writing(target, folder=True, force=True, mode=mode, timeout=timeout, fill=fill) as tmp:
            yield tmp


def _carry(source: Path, destination: Path, top: Path) -> None:
    """Carry ``source`` (below ``top``) to ``destination``: a hard link or copy, a new folder, a new link."""
    info = os.lstat(source)
    if stat.S_ISLNK(info.st_mode):
        os.symlink(os.readlink(source), destination)
    elif stat.S_ISDIR(info.st_mode):
        os.mkdir(destination)
        for entry in sorted(source.iterdir()):
            _carry(entry, destination / entry.name, top)
        shutil.copystat(source, destination, follow_symlinks=False)
    elif stat.S_ISREG(info.st_mode):
        try:
            os.link(source, destination, follow_symlinks=False)
        except OSError:  # a file system without hard links, or a file of another user
            shutil.copy2(source, destination, follow_symlinks=False)
    else:
        raise ValueError(
            f"{source} is not a file, folder or link (a pipe, socket or device); move it out of {top} to update {top}"
        )
