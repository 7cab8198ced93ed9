"""One writer at a time (tensorlotr.files.lock): real processes contend for one output's lock file.

Issue 23, items 3 and 4 (the lock that ``zoo add`` and every final swap hold): mutual
exclusion across processes and threads, a clear timeout that names the holder, a dead
holder's lock taken over at once and its file removed, the exclusive-file fallback where
``flock`` is missing, long names, and signals held by the steps that must not stop half-way.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from pathlib import Path

import pytest

from tensorlotr.files import atomic, lock
from tensorlotr.files.lock import LockWaitWarning, lock_path, remove_stale_lock, write_lock
from tensorlotr.files.siblings import deferred_signals, sibling_stem

#: A child that adds 1 to a counter file ROUNDS times, each read-modify-write under the lock of ``target``.
COUNTER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from tensorlotr.files.lock import write_lock

    target, counter, rounds, go = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
    while not go.exists():
        time.sleep(0.002)
    for _ in range(rounds):
        with write_lock(target, timeout=60):
            value = int(counter.read_text())
            time.sleep(0.001)  # a lost update, were two writers inside at once
            counter.write_text(str(value + 1))
    """
)

#: A child that takes the lock of ``target``, says so, and holds it until killed.
HOLDER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from tensorlotr.files.lock import write_lock

    with write_lock(sys.argv[1]):
        Path(sys.argv[2]).write_text("held")
        time.sleep(300)
    """
)


def _holder(tmp_path: Path, target: Path) -> subprocess.Popen:
    ready = tmp_path / "held"
    child = subprocess.Popen([sys.executable, "-c", HOLDER, str(target), str(ready)])
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert child.poll() is None and time.monotonic() < deadline, "the holder never took the lock"
        time.sleep(0.01)
    return child


def test_two_processes_never_hold_the_lock_at_once(tmp_path):
    target, counter, go = tmp_path / "zoo", tmp_path / "counter", tmp_path / "go"
    counter.write_text("0")
    rounds = 40
    children = [
        subprocess.Popen([sys.executable, "-c", COUNTER, str(target), str(counter), str(rounds), str(go)])
        for _ in range(2)
    ]
    time.sleep(0.5)
    go.write_text("go")
    assert [child.wait(timeout=120) for child in children] == [0, 0]
    assert int(counter.read_text()) == 2 * rounds  # no update lost
    assert not lock_path(target).exists()  # removed by the last writer


def test_a_second_writer_waits_then_fails_naming_the_holder(tmp_path):
    target = tmp_path / "zoo"
    holder = _holder(tmp_path, target)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            start = time.monotonic()
            with pytest.raises(TimeoutError) as error, write_lock(target, timeout=0.5):
                pass
        assert 0.5 <= time.monotonic() - start < 5
        message = str(error.value)
        assert f"pid {holder.pid}" in message and ".zoo.lock" in message and str(target) in message
        assert [w.category for w in caught] == [LockWaitWarning]
        assert f"waiting for pid {holder.pid}, which is writing {target}" in str(caught[0].message)
        assert remove_stale_lock(target) is None  # held: left alone
    finally:
        holder.kill()
        holder.wait()


def test_the_lock_of_a_killed_writer_is_taken_over_and_its_file_removed(tmp_path):
    target = tmp_path / "zoo"
    holder = _holder(tmp_path, target)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert lock_path(target).exists()  # no chance to clean up
    start = time.monotonic()
    with write_lock(target, timeout=5):  # the kernel freed the lock: no wait
        assert time.monotonic() - start < 1
    assert not lock_path(target).exists()
    (tmp_path / "held").unlink()
    holder = _holder(tmp_path, target)  # killed again: its file stays for the next writer of the output
    holder.kill()
    holder.wait()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        done = atomic.recover_leftovers(target)  # the next writer of the output removes the stale file
    assert done == [f"removed {lock_path(target)}, left by an interrupted run"]
    assert [w.category for w in caught] == [atomic.LeftoverWarning]
    assert not lock_path(target).exists()


def test_the_lock_is_reentrant_and_threads_wait_for_each_other(tmp_path):
    target = tmp_path / "out"
    order: list[str] = []
    entered = threading.Event()

    def other() -> None:
        entered.set()
        with write_lock(target, timeout=10):
            order.append("other")

    with write_lock(target), write_lock(target):  # the same thread again: no deadlock
        thread = threading.Thread(target=other)
        thread.start()
        entered.wait()
        time.sleep(0.2)
        order.append("first")
    thread.join(timeout=10)
    assert order == ["first", "other"]
    assert not lock_path(target).exists()


def test_without_flock_a_dead_writers_lock_is_stale_and_a_live_ones_is_not(tmp_path, monkeypatch):
    monkeypatch.setattr(lock, "fcntl", None)
    target = tmp_path / "out"
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()
    lock_path(target).write_text(f"{dead.pid}\n")
    with write_lock(target, timeout=2) as held:
        assert held.read_text() == f"{os.getpid()}\n"
        assert remove_stale_lock(target) is None  # ours, and we run
    assert not lock_path(target).exists()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock_path(target).write_text(f"{alive.pid}\n")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", LockWaitWarning)
            with pytest.raises(TimeoutError, match=f"pid {alive.pid}"), write_lock(target, timeout=0.3):
                pass
        assert lock_path(target).read_text() == f"{alive.pid}\n"  # never removed under a live writer
    finally:
        alive.kill()
        alive.wait()
    assert remove_stale_lock(target) == f"removed {lock_path(target)}, left by an interrupted run"


@pytest.mark.parametrize("name", ["o" * 255, "é" * 127, "a" * 201])
def test_siblings_of_the_longest_names_fit_the_file_system(name, tmp_path):
    target = tmp_path / name
    with write_lock(target) as held:
        assert held.exists() and len(os.fsencode(held.name)) <= 255
    with atomic.atomic_dir(target) as tmp:
        assert len(os.fsencode(tmp.name)) <= 255 and tmp.name.startswith(f".{sibling_stem(target)}.tmp-")
        (tmp / "a.txt").write_text("complete")
    with atomic.atomic_dir(target, force=True) as tmp:
        (tmp / "b.txt").write_text("replaced")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_signals_wait_for_the_end_of_a_deferred_step():
    steps: list[str] = []
    with pytest.raises(KeyboardInterrupt), deferred_signals():
        with deferred_signals():  # nested: delivered once, at the outermost end
            signal.raise_signal(signal.SIGINT)
            steps.append("inner done")
        steps.append("outer done")
    assert steps == ["inner done", "outer done"]
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        with deferred_signals():  # an ignored signal stays ignored
            signal.raise_signal(signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_symbolic_link_planted_at_the_lock_never_leads_to_its_target(tmp_path):
    precious = tmp_path / "precious.txt"
    precious.write_text("precious")
    target = tmp_path / "zoo"
    lock_path(target).symlink_to(precious)
    with pytest.raises(FileExistsError, match="is a symbolic link, not a lock file"), write_lock(target):
        pass
    assert precious.read_text() == "precious"  # not truncated through the link
    assert remove_stale_lock(target) == f"removed {lock_path(target)}, a symbolic link where the lock file goes"
    assert precious.read_text() == "precious" and not os.path.lexists(lock_path(target))
