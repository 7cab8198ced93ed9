"""Atomic outputs under races and signals (tensorlotr.files.atomic), with real concurrent processes.

Issue 23: two writers of one new output at once (item 4), a forced replacement of a
read-only old output and SIGTERM at any moment of a write (item 6), output names as long as
the file system allows (item 12), and a signal once the program has finished (item 14).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from tensorlotr.cli import main as cli
from tensorlotr.io.lotr_format import read_adapter

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def write_lora(folder: Path, seed: int = 0) -> None:
    """A rank-4 PEFT LoRA (non-zero B) on q_proj and v_proj of a tiny 3-layer Llama, written by peft."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=40, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )  # fmt: skip
    base = LlamaForCausalLM(config).eval()
    options = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(base, options).save_pretrained(folder)


def run(args: list[str]) -> int:
    try:
        return cli(args)
    except SystemExit as exc:
        return int(exc.code)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def loras(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("loras")
    write_lora(root / "la", 0)
    write_lora(root / "lb", 1)
    return root


#: A child: imports first, then waits at a barrier (``go``), then runs the command line as the
#: ``tensorlotr`` program does (``main()`` over sys.argv). HOOK ``slow`` makes each write of an
#: adapter's weights take 0.4 s, so that two children started together are both past the
#: early "already exists" check before either puts its output in place; ``sigterm:SECONDS``
#: sends the process SIGTERM that long after its temporary ``.out.tmp-*`` appears.
CHILD = textwrap.dedent(
    """
    import os, signal, sys, threading, time
    from pathlib import Path

    signal.signal(signal.SIGINT, signal.default_int_handler)  # a foreground process, as a user runs it
    import tensorlotr.files.atomic as atomic
    import tensorlotr.io.lotr_format as lotr_format
    import tensorlotr.jobs.convert, tensorlotr.jobs.zoo  # the imports before the barrier
    from tensorlotr.cli import main

    hook, ready, go = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    if hook == "slow":
        save_file = lotr_format.save_file

        def slow_save(*args, **kwargs):
            time.sleep(0.4)
            save_file(*args, **kwargs)

        lotr_format.save_file = slow_save
    elif hook.startswith("sigterm:"):
        temporary, delay = atomic._temporary, float(hook.split(":")[1])

        def signalled_temporary(target, folder):
            made = temporary(target, folder)
            if target.name == "out":
                threading.Timer(delay, os.kill, (os.getpid(), signal.SIGTERM)).start()
            return made

        atomic._temporary = signalled_temporary
    ready.write_text("ready")
    while not go.exists():
        time.sleep(0.002)
    sys.argv = ["tensorlotr", *sys.argv[4:]]
    raise SystemExit(main())
    """
)


def _children(commands: list[list[str]], cwd: Path | list[Path], hook: str | list[str] = "none") -> list:
    """Start one child per command (in ``cwd``, with ``hook``: one for all, or one each), wait until
    every one is ready, then release them together."""
    n = len(commands)
    folders = cwd if isinstance(cwd, list) else [cwd] * n
    hooks = hook if isinstance(hook, list) else [hook] * n
    go = folders[0] / "go"
    go.unlink(missing_ok=True)
    readies = [folder / f"ready-{i}" for i, folder in enumerate(folders)]
    children = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, hook, str(ready), str(go), *command],
            cwd=folder,
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for ready, command, folder, hook in zip(readies, commands, folders, hooks, strict=True)
    ]
    deadline = time.monotonic() + 240
    while not all(r.exists() for r in readies):
        assert time.monotonic() < deadline and all(c.poll() is None for c in children), "a child never got ready"
        time.sleep(0.02)
    for ready in readies:
        ready.unlink()
    go.write_text("go")
    return children


@pytest.mark.parametrize("hook", ["slow", "none"])
def test_two_runs_writing_one_new_output_exactly_one_wins(hook, loras, tmp_path):
    for source in ("la", "lb"):
        assert run(["convert", str(loras / source), str(tmp_path / f"ref-{source}"), "--json"]) == 0
    for _ in range(3):
        out = tmp_path / "out"
        children = _children([["convert", str(loras / s), "out", "--json"] for s in ("la", "lb")], tmp_path, hook)
        done = [(c.wait(timeout=240), c.stderr.read()) for c in children]
        codes = sorted(code for code, _ in done)
        assert codes == [0, 2], done
        [winner] = [i for i, (code, _) in enumerate(done) if code == 0]
        [loser] = [err for code, err in done if code == 2]
        assert "tensorlotr convert: error: out already exists" in loser and "Traceback" not in loser
        expected = load_file(tmp_path / f"ref-{('la', 'lb')[winner]}" / "lotr_model.safetensors")
        written = load_file(out / "lotr_model.safetensors")
        assert written.keys() == expected.keys() and all(torch.equal(written[k], expected[k]) for k in expected)
        assert read_adapter(out).groups["q_proj"].rank == (12, 12)
        assert hidden(tmp_path) == []
        for child in children:
            child.stdout.close()
            child.stderr.close()
        shutil.rmtree(out)


def _without_file_privileges() -> None:
    """In the child: drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH, so even root obeys file modes."""
    if os.geteuid() != 0:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2):
        if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def test_force_over_a_read_only_old_output_leaves_nothing_behind(loras, tmp_path):
    assert run(["convert", str(loras / "la"), str(tmp_path / "out"), "--rank", "2", "--json"]) == 0
    (tmp_path / "out" / "sub").mkdir()
    (tmp_path / "out" / "sub" / "f").write_text("x")
    os.chmod(tmp_path / "out" / "sub", 0o555)
    os.chmod(tmp_path / "out", 0o555)
    done = subprocess.run(
        [sys.executable, "-m", "tensorlotr", "convert", str(loras / "la"), "out", "--force", "--json"],
        cwd=tmp_path, env=ENV, capture_output=True, text=True, check=False, preexec_fn=_without_file_privileges,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "warning" not in done.stderr
    assert hidden(tmp_path) == []  # the old output is gone, not left as .out.tmp-*
    assert read_adapter(tmp_path / "out").groups["q_proj"].rank == (12, 12)


@pytest.mark.parametrize("command", ["convert", "zoo-add"])
def test_sigterm_at_any_moment_leaves_no_leftovers_and_a_truthful_exit_code(command, loras, tmp_path):
    delays = [0.0, 0.001, 0.002, 0.003, 0.004, 0.006, 0.009, 0.013, 0.02, 0.03]  # after .out.tmp-* appears
    rounds = len(delays)
    folders = [tmp_path / f"run-{i}" for i in range(rounds)]
    for folder in folders:
        folder.mkdir()
        if command == "convert":
            assert run(["convert", str(loras / "la"), str(folder / "out"), "--rank", "2", "--json"]) == 0
        else:
            assert run(["zoo", "compress", str(loras / "la"), str(folder / "out"), "--json"]) == 0
    args = {
        "convert": ["convert", str(loras / "la"), "out", "--force", "--json"],
        "zoo-add": ["zoo", "add", "out", str(loras / "lb"), "--json"],
    }[command]
    old = [snapshot(f / "out") for f in folders]
    children = _children([args] * rounds, folders, [f"sigterm:{d}" for d in delays])  # each in its folder
    codes = []
    for i, (child, folder) in enumerate(zip(children, folders, strict=True)):
        code, err = child.wait(timeout=240), child.stderr.read()
        child.stdout.close()
        child.stderr.close()
        codes.append(code)
        assert "Traceback" not in err, err
        assert hidden(folder) == [], (i, err)  # nothing left behind, whenever the signal came
        assert code in (0, 143), err
        now = snapshot(folder / "out")
        if code == 143:  # interrupted: the old output, whole
            assert now == old[i], err
            assert err.strip().splitlines()[-1].endswith(": terminated")
        else:  # success: the new output, whole
            assert now != old[i]
            if command == "convert":
                assert read_adapter(folder / "out").groups["q_proj"].rank == (12, 12)
            else:
                assert run(["inspect", str(folder / "out"), "--json"]) == 0
    assert 143 in codes  # the signals did land during the writes


def test_a_signal_once_the_program_has_finished_is_quiet(loras, tmp_path):
    """Ctrl-C while the interpreter shuts down (an atexit callback that takes its time): no traceback."""
    child_code = textwrap.dedent(
        """
        import atexit, signal, sys, time
        from pathlib import Path

        signal.signal(signal.SIGINT, signal.default_int_handler)

        def slow_shutdown():
            Path("finished").write_text("finished")
            time.sleep(1.5)

        atexit.register(slow_shutdown)
        from tensorlotr.cli import main

        sys.argv = ["tensorlotr", *sys.argv[1:]]
        raise SystemExit(main())
        """
    )
    child = subprocess.Popen(
        [sys.executable, "-c", child_code, "convert", str(loras / "la"), "out", "--json"],
        cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 240
    while not (tmp_path / "finished").exists():
        assert child.poll() is None and time.monotonic() < deadline, child.communicate()
        time.sleep(0.01)
    child.send_signal(signal.SIGINT)
    _, err = child.communicate(timeout=60)
    assert child.returncode == 0, err
    assert "Traceback" not in err and "Exception ignored" not in err, err
    assert read_adapter(tmp_path / "out").groups["q_proj"].rank == (12, 12)


@pytest.mark.parametrize("name", ["o" * 240, "é" * 127])
def test_output_names_as_long_as_the_file_system_allows(name, loras, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert run(["convert", str(loras / "la"), name, "--json"]) == 0
    assert run(["convert", str(loras / "la"), name, "--rank", "2", "--force", "--json"]) == 0
    assert read_adapter(tmp_path / name).groups["q_proj"].rank == (2, 2)
    assert hidden(tmp_path) == []
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(tmp_path / "runs" / "a")) as writer:
        writer.add_scalar("loss", 1.0, 0)
    parquet = "p" * 245 + ".parquet"  # 253 bytes
    assert run(["tb2parquet", "runs", parquet, "--json"]) == 0
    assert run(["tb2parquet", "runs", parquet, "--force", "--json"]) == 0
    assert (tmp_path / parquet).stat().st_size > 0 and hidden(tmp_path) == []
    assert "File name too long" not in capsys.readouterr().err


def test_outputs_whose_place_is_taken_are_refused_before_the_work(loras, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    assert run(["convert", str(loras / "la"), str(tmp_path / "afile" / "sub" / "out")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'afile'} is not a folder; {tmp_path / 'afile' / 'sub' / 'out'} cannot be written" in err
    assert "converting" not in err  # refused before any work
    (tmp_path / "adir").mkdir()
    (tmp_path / "adir" / "keep").write_text("keep")
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(tmp_path / "runs" / "a")) as writer:
        writer.add_scalar("loss", 1.0, 0)
    assert run(["tb2parquet", str(tmp_path / "runs"), str(tmp_path / "adir"), "--force", "--json"]) == 2
    assert "adir is a folder; the output is a file" in capsys.readouterr().err
    assert (tmp_path / "adir" / "keep").read_text() == "keep" and hidden(tmp_path) == []
