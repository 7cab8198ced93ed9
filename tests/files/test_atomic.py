"""Atomic writes (files/atomic.py): outputs that would destroy inputs are refused; replacement, recovery, modes.

One test per defect found by trying the commands as a new user and a hostile one would (issue 10).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from builders import dead_pid, error_line, hidden, run, snapshot, write_lora

from tensorlotr.files import atomic
from tensorlotr.io import read_adapter
from tensorlotr.jobs.convert import convert_lora
from tensorlotr.jobs.export import export_lora

# --- outputs that would destroy an input --------------------------------------------------


def test_output_equal_to_the_input_is_refused_even_with_force(lora, capsys):
    before = snapshot(lora)
    assert run(["convert", str(lora), str(lora), "--force"]) == 2
    assert "is the input" in error_line(capsys.readouterr().err, "convert")
    assert snapshot(lora) == before


@pytest.mark.parametrize("command", ["convert", "export-lora"])
def test_output_containing_or_inside_the_input_is_refused(command, tmp_path, capsys):
    source = tmp_path / "par" / "in"
    write_lora(source)
    if command == "export-lora":
        assert run(["convert", str(source), str(tmp_path / "lotr"), "--json"]) == 0
        shutil.rmtree(source)
        shutil.move(tmp_path / "lotr", source)
    capsys.readouterr()
    before = snapshot(tmp_path / "par")
    assert run([command, str(source), str(tmp_path / "par"), "--force"]) == 2
    assert "contains the input" in error_line(capsys.readouterr().err, command)
    assert run([command, str(source), str(source / "sub"), "--force"]) == 2
    assert "lies inside the input" in error_line(capsys.readouterr().err, command)
    assert snapshot(tmp_path / "par") == before


@pytest.mark.parametrize("output", [".", "..", "sub/.."])
def test_current_or_parent_folder_as_output_is_refused(output, lora, tmp_path, monkeypatch, capsys):
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    before = snapshot(tmp_path)
    assert run(["convert", str(lora), output, "--force"]) == 2
    assert "names the current or a parent folder" in error_line(capsys.readouterr().err, "convert")
    assert snapshot(tmp_path) == before


# --- replacing an output, and what an interrupted replacement leaves ------------------------


def test_replacement_by_two_renames_puts_the_old_output_back_when_interrupted(tmp_path, monkeypatch):
    """Without RENAME_EXCHANGE, an interruption between the two renames restores the old output."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    monkeypatch.setattr(atomic, "_exchange", lambda first, second: False)
    rename = os.rename

    def interrupted(src: os.PathLike, dst: os.PathLike) -> None:
        if Path(src).name.startswith(".out.tmp-"):  # the second rename: the old output is already aside
            raise KeyboardInterrupt
        rename(src, dst)

    monkeypatch.setattr(os, "rename", interrupted)
    with pytest.raises(KeyboardInterrupt), atomic.atomic_dir(out, force=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert snapshot(out) == {"old.txt": b"old"} and hidden(tmp_path) == []
    monkeypatch.setattr(os, "rename", rename)
    with atomic.atomic_dir(out, force=True) as tmp:  # the fallback, uninterrupted
        (tmp / "new.txt").write_text("new")
    assert snapshot(out) == {"new.txt": b"new"} and hidden(tmp_path) == []


def test_replacement_is_one_exchange(tmp_path, monkeypatch):
    """On Linux the old output is never absent: one renameat2(RENAME_EXCHANGE), no second rename."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")

    def no_rename(src: os.PathLike, dst: os.PathLike) -> None:
        raise AssertionError(f"rename {src} -> {dst}: the exchange should have been used")

    monkeypatch.setattr(os, "rename", no_rename)
    with atomic.atomic_dir(out, force=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert snapshot(out) == {"new.txt": b"new"} and hidden(tmp_path) == []


@pytest.mark.parametrize("legacy", [False, True])
def test_a_crash_between_the_two_renames_is_recovered_by_the_next_run(legacy, lora, tmp_path, capsys):
    assert run(["convert", str(lora), str(tmp_path / "out"), "--rank", "2", "--json"]) == 0
    before = snapshot(tmp_path / "out")
    # what a kill -9 between the renames leaves; older versions moved the old output to .out.old-*/x
    aside = tmp_path / (".out.old-abcdefgh" if legacy else f".out.old-{dead_pid()}-abcdefgh")
    if legacy:
        aside.mkdir()
    (tmp_path / "out").rename(aside / "x" if legacy else aside)
    capsys.readouterr()
    assert run(["convert", str(lora), str(tmp_path / "out"), "--json"]) == 2  # restored, so it exists
    err = capsys.readouterr().err
    assert f"warning: restored {tmp_path / 'out'} from {aside.name}" in err
    assert "already exists" in error_line(err, "convert")
    assert snapshot(tmp_path / "out") == before and hidden(tmp_path) == []


def test_leftovers_of_a_killed_run_are_removed_and_reported(lora, tmp_path, capsys):
    assert run(["convert", str(lora), str(tmp_path / "out"), "--json"]) == 0
    stale = tmp_path / f".out.tmp-{dead_pid()}-abcdefgh"
    stale.mkdir()
    (stale / "lotr_model.safetensors").write_bytes(b"\0" * 1000)
    old = tmp_path / f".out.old-{dead_pid()}-abcdefgh"  # out exists: this is stale, not restored
    old.mkdir()
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as running:
        live = tmp_path / f".out.tmp-{running.pid}-abcdefgh"  # a writer that still runs
        live.mkdir()
        try:
            assert run(["convert", str(lora), str(tmp_path / "out"), "--rank", "2", "--force", "--json"]) == 0
        finally:
            running.kill()
    err = capsys.readouterr().err
    assert f"warning: removed {stale}, left by an interrupted run" in err
    assert f"warning: removed {old}, left by an interrupted run" in err
    assert hidden(tmp_path) == [live.name]
    assert read_adapter(tmp_path / "out").groups["q_proj"].rank == (2, 2)


# --- modes ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("umask", "folder", "file"), [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600)])
def test_outputs_honour_the_umask(umask, folder, file, lora, tmp_path):
    previous = os.umask(umask)
    try:
        convert_lora(lora, tmp_path / "lotr")
        export_lora(tmp_path / "lotr", tmp_path / "exported")
        convert_lora(lora, tmp_path / "lotr", rank=2, force=True)  # a replaced output too
    finally:
        os.umask(previous)
    for out in (tmp_path / "lotr", tmp_path / "exported"):
        assert out.stat().st_mode & 0o777 == folder
        assert {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()} == dict.fromkeys(os.listdir(out), file)
