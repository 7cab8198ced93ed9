"""A convert killed while it replaces its output: OUT_DIR keeps the complete old output, or the new one.

A child process runs the command line with a hook that pauses at one point of the write;
the test then kills it (SIGKILL, SIGTERM or SIGINT) there, and lets the pause end. Whatever
the signal, OUT_DIR must hold a complete output once the next run has gone, with no temporary
folder left: the old one when the signal came while writing, and after SIGTERM or Ctrl-C
during the swap (which holds them until it is done) the new one, with exit code 0.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from builders import error_line, hidden, run, snapshot, write_lora

from tensorlotr.io.lotr_format import read_adapter

#: The child: the command line, with a pause (``READY`` written, then a long sleep) at ``STAGE``.
CHILD = textwrap.dedent(
    """
    import os, signal, sys, time
    from pathlib import Path

    # a shell's background job (`make test &`) starts with SIGINT ignored, and Python keeps it
    # so; a user's Ctrl-C reaches a foreground process, which this child stands for
    signal.signal(signal.SIGINT, signal.default_int_handler)

    import tensorlotr.io.atomic as atomic
    import tensorlotr.io.lotr_format as lotr_format
    from tensorlotr.cli import main

    stage, ready = sys.argv[1], Path(sys.argv[2])

    def pause():  # until the test has sent its signal: a signal held by the swap does not end it
        ready.write_text("ready")
        go, deadline = ready.with_name("go"), time.monotonic() + 300
        while not go.exists() and time.monotonic() < deadline:
            time.sleep(0.01)

    if stage == "writing":  # the weights are written into the temporary folder, the config is not
        save_file = lotr_format.save_file

        def paused_save(*args, **kwargs):
            save_file(*args, **kwargs)
            pause()

        lotr_format.save_file = paused_save
    elif stage == "exchange":  # the new output is complete and about to be swapped in
        exchange = atomic._exchange

        def paused_exchange(first, second):
            pause()
            return exchange(first, second)

        atomic._exchange = paused_exchange
    elif stage == "renames":  # no exchange: the old output is renamed aside, the new one not yet in place
        atomic._exchange = lambda first, second: False
        rename = os.rename

        def paused_rename(src, dst):
            if Path(src).name.startswith(".out.tmp-"):
                pause()
            rename(src, dst)

        os.rename = paused_rename
    sys.exit(main(sys.argv[3:]))
    """
)


def _interrupt(stage: str, signum: int, args: list[str], folder: Path) -> subprocess.CompletedProcess:
    """Run ``tensorlotr ARGS`` in a child, send ``signum`` once it pauses at ``stage``, and wait for it."""
    ready = folder / "ready"
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, stage, str(ready), *args],
        cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    deadline = time.monotonic() + 240
    while not ready.exists():
        if child.poll() is not None or time.monotonic() > deadline:
            child.kill()
            out, err = child.communicate()
            pytest.fail(f"the child never reached {stage} (exit code {child.returncode}): {err}")
        time.sleep(0.05)
    child.send_signal(signum)
    time.sleep(0.2)
    (folder / "go").write_text("go")
    out, err = child.communicate(timeout=120)
    ready.unlink()
    (folder / "go").unlink()
    return subprocess.CompletedProcess(child.args, child.returncode, out, err)


@pytest.fixture(scope="module")
def lora(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("fault") / "lora"
    write_lora(folder)
    return folder


@pytest.mark.parametrize(
    ("stage", "signum"),
    [
        ("writing", signal.SIGKILL),
        ("exchange", signal.SIGKILL),
        ("renames", signal.SIGKILL),
        ("writing", signal.SIGTERM),
        ("exchange", signal.SIGTERM),
        ("renames", signal.SIGTERM),
        ("writing", signal.SIGINT),
        ("exchange", signal.SIGINT),
    ],
)
def test_killed_while_replacing_the_output(stage, signum, lora, tmp_path, capsys):
    out = tmp_path / "out"
    assert run(["convert", str(lora), str(out), "--rank", "2", "--json"]) == 0
    old = snapshot(out)
    done = _interrupt(stage, signum, ["convert", str(lora), str(out), "--force", "--json"], tmp_path)
    if signum == signal.SIGKILL:  # no chance to clean up: the leftovers wait for the next run
        assert done.returncode == -signal.SIGKILL
        assert any(name.startswith(".out.tmp-") for name in hidden(tmp_path))
        if stage == "renames":  # the old output is complete, aside
            [aside] = [tmp_path / n for n in hidden(tmp_path) if n.startswith(".out.old-")]
            assert not out.exists() and snapshot(aside) == old
        else:
            assert snapshot(out) == old
    else:
        code, word = {signal.SIGTERM: (143, "terminated"), signal.SIGINT: (130, "interrupted")}[signum]
        last = done.stderr.strip().splitlines()[-1]
        assert "Traceback" not in done.stderr
        assert hidden(tmp_path) == []
        if stage == "writing":
            assert done.returncode == code, done.stderr
            assert last == f"tensorlotr convert: {word}"
            assert snapshot(out) == old
        else:  # the swap had begun: it completes, and the exit code says the output is complete
            assert done.returncode == 0, done.stderr
            assert last == f"tensorlotr convert: {word} after writing {out}, which is complete"
            assert read_adapter(out).groups["q_proj"].rank == (12, 12)
            old = snapshot(out)
    capsys.readouterr()
    # the next run: it recovers and cleans up, then refuses the existing output without --force
    assert run(["convert", str(lora), str(out), "--json"]) == 2
    err = capsys.readouterr().err
    assert "already exists" in error_line(err, "convert")
    assert ("left by an interrupted run" in err) == (signum == signal.SIGKILL)
    assert snapshot(out) == old and hidden(tmp_path) == []
    assert run(["convert", str(lora), str(out), "--force", "--json"]) == 0
    assert read_adapter(out).groups["q_proj"].rank == (12, 12) and hidden(tmp_path) == []
