"""The command line (cli/main.py): its conventions, flags checked before any work, exit codes and one-line errors."""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys

import pytest
from builders import error_line, peft_variant, run, write_lora

from tensorlotr.cli import build_parser
from tensorlotr.cli import main as cli
from tensorlotr.jobs.convert import convert_lora


def test_bare_command_prints_help_and_exits_2(capsys):
    assert cli([]) == 2
    assert "usage: tensorlotr" in capsys.readouterr().err


def test_every_positional_has_help():
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command")
    for name, sub in subparsers.choices.items():
        for action in sub._actions:
            if not action.option_strings:
                assert action.help, f"{name} {action.metavar}: no help text"


@pytest.mark.parametrize(
    "argv",
    [
        ["convert", "missing", "out", "--rank", "0"],
        ["convert", "missing", "out", "--energy", "1.5"],
        ["convert", "missing", "out", "--energy", "nan"],
        ["convert", "missing", "out", "--hooi-iters", "-1"],
        ["decompose", "a", "b", "out", "--target-modules", "q", "--power-iters", "-2"],
        ["decompose", "a", "b", "out", "--target-modules", "re:(", "--rank", "4"],
        ["tb2parquet", "logs", "out.parquet", "--names", "a,a"],
        ["tb2parquet", "logs", "out.parquet", "--names", "model,step"],
        ["tb2parquet", "logs", "out.parquet", "--tags", "["],
        ["demo", "--rank", "-3"],
    ],
)
def test_flags_are_checked_before_any_work(argv, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        cli(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_one_rank_syntax_everywhere():
    parser = build_parser()
    assert parser.parse_args(["convert", "a", "b", "--rank", "16,8"]).rank == (16, 8)
    assert parser.parse_args(["decompose", "a", "b", "c", "--target-modules", "q", "--rank", "4"]).rank == 4
    assert parser.parse_args(["demo", "--rank", "8,4"]).rank == (8, 4)


def test_list_flags_are_comma_separated_and_old_forms_warn():
    parser = build_parser()
    args = parser.parse_args(["tb2parquet", "l", "o.parquet", "--names", "a,b,c", "--index", "a,b"])
    assert args.names == ["a", "b", "c"] and args.index == ["a", "b"]
    with pytest.warns(FutureWarning, match="deprecated"):
        assert parser.parse_args(["tb2parquet", "l", "o.parquet", "--names", "a", "b"]).names == ["a", "b"]
    args = parser.parse_args(["convert", "a", "b", "--groups", "attn=q_proj,v_proj;mlp=up_proj"])
    assert args.groups == {"attn": ["q_proj", "v_proj"], "mlp": ["up_proj"]}
    with pytest.warns(FutureWarning, match="deprecated"):
        assert parser.parse_args(["convert", "a", "b", "--groups", "qv=q_proj+v_proj"]).groups == {
            "qv": ["q_proj", "v_proj"]
        }
    assert parser.parse_args(["decompose", "a", "b", "c", "--target-modules", "q_proj,v_proj"]).target_modules == [
        "q_proj",
        "v_proj",
    ]


def test_missing_input_is_one_line_exit_2_and_debug_shows_the_traceback(tmp_path, capsys):
    assert cli(["inspect", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("tensorlotr inspect: error:") and "nope" in err
    assert cli(["inspect", str(tmp_path / "nope"), "--debug"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_console_script(tmp_path):
    peft_variant("bert", tmp_path / "peft")
    done = subprocess.run(
        [sys.executable, "-m", "tensorlotr", "convert", str(tmp_path / "peft"), str(tmp_path / "out"), "--json"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["modules_to_save"] == ["classifier"]


def test_rank_above_the_exact_rank_is_clipped_and_reported(lora, tmp_path, capsys):
    exact = convert_lora(lora, None)
    assert run(["convert", str(lora), str(tmp_path / "out"), "--rank", "100000", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [g["rank"] for g in report["groups"]] == [list(g.rank) for g in exact.groups]
    assert report["totals"]["lotr_params"] == exact.lotr_params
    assert any("100000x100000" in note for note in report["notes"])


# --- tracebacks --------------------------------------------------------------------------------


def _without_file_privileges() -> None:
    """In the child: drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH, so even root obeys file modes."""
    if os.geteuid() != 0:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2):
        if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def test_permission_errors_exit_1_and_name_the_file(tmp_path):
    write_lora(tmp_path / "lora")
    (tmp_path / "readonly").mkdir()
    os.chmod(tmp_path / "readonly", 0o555)
    os.chmod(tmp_path / "lora" / "adapter_config.json", 0o000)
    for args, culprit in (
        (["convert", "lora", "out"], "lora/adapter_config.json"),
        (["export-lora", "lora", "readonly/out"], "readonly/out"),
    ):
        if args[0] == "export-lora":
            os.chmod(tmp_path / "lora" / "adapter_config.json", 0o644)
            convert_lora(tmp_path / "lora", tmp_path / "lotr")
            args[1] = "lotr"
        done = subprocess.run(
            [sys.executable, "-m", "tensorlotr", *args, "--json"], cwd=tmp_path, capture_output=True, text=True,
            check=False, preexec_fn=_without_file_privileges,
        )  # fmt: skip
        assert done.returncode == 1, done.stderr
        line = error_line(done.stderr, args[0])
        assert culprit in line and "Permission denied" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora", "lotr", "readonly"]
    assert list((tmp_path / "readonly").iterdir()) == []


def test_broken_pipe_is_quiet(lora):
    child = subprocess.Popen(
        [sys.executable, "-m", "tensorlotr", "inspect", str(lora)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    child.stdout.close()  # the reader leaves before anything is written, as `| head -0` does
    err = child.stderr.read().decode()
    assert child.wait() == 0 and err == ""


def test_bad_regexes_on_the_command_line_are_one_line_errors(pair, capsys):
    (pair / "logs").mkdir()
    assert run(["tb2parquet", str(pair / "logs"), str(pair / "x.parquet"), "--tags", "("]) == 2
    assert "invalid regular expression '('" in error_line(capsys.readouterr().err, "tb2parquet")
    args = ["decompose", str(pair / "base"), str(pair / "ft"), str(pair / "o"), "--target-modules", "re:("]
    assert run(args) == 2
    assert "invalid regular expression '('" in error_line(capsys.readouterr().err, "decompose")


# --- issue 23, item 14: messages that name the culprit ----------------------------------------------------


def test_an_unreadable_adapter_weights_file_says_why(tmp_path):
    write_lora(tmp_path / "lora")
    os.chmod(tmp_path / "lora" / "adapter_model.safetensors", 0o000)
    done = subprocess.run(
        [sys.executable, "-m", "tensorlotr", "convert", "lora", "out"], cwd=tmp_path, capture_output=True, text=True,
        check=False, preexec_fn=_without_file_privileges,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    line = error_line(done.stderr, "convert")
    assert "lora/adapter_model.safetensors" in line and "Permission denied" in line, line
    assert "No such file or directory" not in line and "truncated or corrupt" not in line
    assert not (tmp_path / "out").exists()


def test_calibration_inputs_are_named_when_missing(lora, tmp_path, capsys):
    from builders import tiny_llama

    tiny_llama(0).save_pretrained(tmp_path / "base")  # a model folder without a tokenizer
    (tmp_path / "texts.txt").write_text("a few words\nand some more\n")
    args = ["convert", str(lora), str(tmp_path / "out"), "--base-model", str(tmp_path / "base")]
    assert run([*args, "--calibration-data", str(tmp_path / "nope.txt")]) == 2
    line = error_line(capsys.readouterr().err, "convert")
    assert f"{tmp_path / 'nope.txt'}" in line and "no such calibration file" in line, line
    assert run([*args, "--calibration-data", str(tmp_path / "texts.txt")]) == 2
    line = error_line(capsys.readouterr().err, "convert")
    assert f"{tmp_path / 'base'} has no tokenizer" in line, line
    assert not (tmp_path / "out").exists()


def test_inspect_with_stdout_closed_says_so(lora):
    done = subprocess.run(
        [sys.executable, "-m", "tensorlotr", "inspect", str(lora)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True, check=False, preexec_fn=lambda: os.close(1),
    )  # fmt: skip
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "NoneType" not in done.stderr and "stdout is closed" in error_line(done.stderr, "inspect")


def test_deprecation_warnings_print_as_one_line_without_a_source_path(tmp_path):
    (tmp_path / "logs").mkdir()
    done = subprocess.run(
        [sys.executable, "-m", "tensorlotr", "tb2parquet", "logs", "x.parquet", "--names", "a", "b"], cwd=tmp_path,
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    warning = [line for line in done.stderr.splitlines() if "deprecated" in line]
    assert warning and warning[0].startswith("tensorlotr tb2parquet: warning: "), done.stderr
    assert ".py:" not in done.stderr and "FutureWarning" not in done.stderr, done.stderr
