"""The hidden siblings of an output: their names, the writers they belong to, and signal-safe sections.

A writer of ``OUT`` works next to it, in hidden siblings named ``.OUT.tmp-<pid>-<random>``,
``.OUT.old-<pid>-<random>`` and ``.OUT.lock`` (:mod:`tensorlotr.files.atomic`,
:mod:`tensorlotr.files.lock`). A legal name may use up to 255 bytes, too many for such a
sibling: a name too long is shortened to its first bytes and a hash of the whole name
(:func:`sibling_stem`), the same every time, so the next run finds the leftovers of the last.

A sibling made or removed while Ctrl-C or SIGTERM raises in the middle would be left behind;
:func:`deferred_signals` holds those signals until such a step is done.
"""

from __future__ import annotations

import hashlib
import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

#: Names up to this many bytes are kept whole in the siblings' names (255 bytes less the
#: longest suffix, ``.tmp-<7-digit pid>-<8 random>``, and the leading dot, with room to spare).
MAX_STEM_BYTES = 200
_KEPT_BYTES = 180  # of a longer name: its first bytes, then "~" and 16 hex digits of its hash
_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def sibling_stem(target: str | os.PathLike[str]) -> str:
    """The part of ``target``'s name that its hidden siblings carry: the name, or a short stand-in for a long one.

    Examples
    --------
    >>> sibling_stem("runs/my-lotr")
    'my-lotr'
    >>> stem = sibling_stem("x" * 250)  # 250 bytes: ".NAME.tmp-<pid>-<random>" would pass 255
    >>> len(stem.encode()), stem[:3], stem[180]
    (197, 'xxx', '~')
    >>> sibling_stem("x" * 250) == stem
    True
    """
    name = Path(target).name
    raw = os.fsencode(name)
    if len(raw) <= MAX_STEM_BYTES:
        return name
    digest = hashlib.sha256(raw).hexdigest()[:16]
    kept, size = [], 0
    for character in name:  # whole characters, never half of one
        size += len(os.fsencode(character))
        if size > _KEPT_BYTES:
            break
        kept.append(character)
    return f"{''.join(kept)}~{digest}"


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (another user's process counts as running).

    Examples
    --------
    >>> pid_alive(os.getpid()), pid_alive(999_999_999)
    (True, False)
    """
    if pid == os.getpid():
        return True
    if pid <= 0:
        return False
    if os.name == "nt":  # os.kill(pid, 0) would end the process there
        return _windows_pid_alive(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OverflowError:
        return False
    return True


def _windows_pid_alive(pid: int) -> bool:
    import ctypes

    kernel32 = ctypes.windll.kernel32  # type: ignore[attr-defined]
    handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
    if not handle:
        return int(kernel32.GetLastError()) == 5  # access denied: it runs, as another user
    code = ctypes.c_ulong()
    try:
        return bool(kernel32.GetExitCodeProcess(handle, ctypes.byref(code))) and code.value == 259  # STILL_ACTIVE
    finally:
        kernel32.CloseHandle(handle)


class _Held:
    """The signals caught while a :func:`deferred_signals` block ran, and the handlers it replaced."""

    def __init__(self) -> None:
        self.caught: list[int] = []
        self.previous: dict[int, Callable[[int, FrameType | None], Any] | int] = {}

    def record(self, signum: int, _frame: FrameType | None) -> None:
        if signum not in self.caught:
            self.caught.append(signum)


@contextmanager
def deferred_signals() -> Iterator[None]:
    """Hold Ctrl-C (SIGINT) and SIGTERM while the block runs; deliver them, as they would have been, after it.

    For the short steps that must not stop half-way: making a temporary sibling and
    noting it for the clean-up, swapping the new output in, removing what is left. Only the
    main thread receives signals in Python; elsewhere the block runs as it is. Ignored
    signals stay ignored.

    Examples
    --------
    >>> import signal
    >>> try:
    ...     with deferred_signals():
    ...         signal.raise_signal(signal.SIGINT)  # Ctrl-C in the middle of the step
    ...         print("the step is complete")
    ... except KeyboardInterrupt:
    ...     print("then interrupted")
    the step is complete
    then interrupted
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = _Held()
    for signum in _SIGNALS:
        handler = signal.getsignal(signum)
        if handler is None or handler == signal.SIG_IGN:
            continue
        held.previous[signum] = handler
        signal.signal(signum, held.record)
    try:
        yield
    finally:
        for number, replaced in held.previous.items():
            signal.signal(number, replaced)
        for number in held.caught:
            signal.raise_signal(number)
