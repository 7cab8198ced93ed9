"""The architecture's import rules, the one result type, and the command line's conventions."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tensorlotr.cli import build_parser
from tensorlotr.cli import main as cli

PACKAGE = Path(__file__).resolve().parents[1] / "tensorlotr"

#: Each layer may import itself and the layers listed; the jobs are the top-level modules.
ALLOWED = {
    "core": {"core"},
    "files": {"files"},
    "adapter": {"core", "files", "adapter"},
    "io": {"core", "files", "adapter", "io"},
    "nn": {"core", "files", "adapter", "io", "nn", "progress", "report"},
}


def _imported_modules(code: str) -> list[str]:
    return [
        line
        for line in subprocess.run(
            [sys.executable, "-c", code + "\nimport sys\nprint('\\n'.join(sorted(sys.modules)))"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        if line.startswith("tensorlotr")
    ]


@pytest.mark.parametrize("job", ["tensorlotr.jobs.convert", "tensorlotr.jobs.decompose"])
def test_file_jobs_do_not_import_the_torch_bindings(job):
    loaded = _imported_modules(f"import {job}")
    assert job in loaded
    assert not [m for m in loaded if m == "tensorlotr.nn" or m.startswith("tensorlotr.nn.")], loaded


#: Call-time imports allowed upward, for PEFT's conveniences: (module, function, imported layer).
LAZY_UPWARD = {
    ("nn/model.py", "from_lora", "jobs"),
}


def _package_imports(path: Path) -> set[str]:
    """First-level tensorlotr subpackages/modules that ``path`` imports (call-time imports included,
    except the conveniences of ``LAZY_UPWARD``)."""
    tree = ast.parse(path.read_text())
    depth = len(path.relative_to(PACKAGE).parts) - 1  # 0 for a top-level module
    allowed_nodes = set()
    for func in ast.walk(tree):
        if isinstance(func, ast.FunctionDef):
            for sub in ast.walk(func):
                if (
                    isinstance(sub, ast.ImportFrom)
                    and (
                        str(path.relative_to(PACKAGE)),
                        func.name,
                        (sub.module or "").split(".")[0],
                    )
                    in LAZY_UPWARD
                ):
                    allowed_nodes.add(id(sub))
    found = set()
    for node in ast.walk(tree):
        if id(node) in allowed_nodes:
            continue
        if isinstance(node, ast.ImportFrom) and node.level:
            up = node.level - 1
            parts = list(path.relative_to(PACKAGE).parts[:-1])
            if up > depth:
                continue
            base = parts[: len(parts) - up]
            target = [*base, *(node.module.split(".") if node.module else [])]
            if target:
                found.add(target[0])
            else:  # ``from . import x`` at the top level
                found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tensorlotr."):
            found.add(node.module.split(".")[1])
    return found


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_layers_import_only_downward(layer):
    for path in sorted((PACKAGE / layer).rglob("*.py")):
        imported = _package_imports(path) - {"_version"}
        assert imported <= ALLOWED[layer], f"{path.relative_to(PACKAGE)} imports {sorted(imported - ALLOWED[layer])}"


def test_code_outside_core_uses_its_public_surface():
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.is_relative_to(PACKAGE / "core"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("core."):
                pytest.fail(f"{path.relative_to(PACKAGE)} imports tensorlotr.{node.module}; use tensorlotr.core")


def test_only_the_adapter_layout_formats_tensor_keys():
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == PACKAGE / "adapter" / "layout.py":
            continue
        text = path.read_text()
        for key in ('f"factors.', 'f"cores.', 'f"modules_to_save.'):
            assert key not in text, f"{path.relative_to(PACKAGE)} formats an adapter key ({key})"


# --- the command line ---------------------------------------------------------------------


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


def test_inspect_json_gives_ranks_as_pairs_for_lora_and_lotr(tmp_path, capsys):
    from test_convert import make_peft

    make_peft("llama", tmp_path / "peft")
    assert cli(["convert", str(tmp_path / "peft"), str(tmp_path / "lotr"), "--rank", "4,2"]) == 0
    capsys.readouterr()
    ranks = {}
    for name in ("peft", "lotr"):
        assert cli(["inspect", str(tmp_path / name), "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        ranks[name] = [g["rank"] for g in report["groups"]]
        assert report["totals"]["params"] == sum(g["params"] for g in report["groups"])
    assert all(isinstance(r, list) and len(r) == 2 for rs in ranks.values() for r in rs)
    assert ranks["lotr"] == [[4, 2]] * 3


def test_every_job_result_renders_as_text_and_json(tmp_path):
    from test_convert import make_peft

    import tensorlotr as tlr
    from tensorlotr.convert import inspect_adapter
    from tensorlotr.report import Result

    make_peft("llama", tmp_path / "peft")
    results = [
        tlr.convert_lora(tmp_path / "peft", tmp_path / "lotr", rank=2),
        tlr.export_lora(tmp_path / "lotr", tmp_path / "lora"),
        inspect_adapter(tmp_path / "lotr"),
        inspect_adapter(tmp_path / "peft"),
    ]
    for result in results:
        assert isinstance(result, Result)
        assert result.text() and json.loads(result.to_json()) == json.loads(json.dumps(result.to_dict()))


def test_rank_above_the_exact_rank_is_clipped_and_reported(tmp_path):
    from test_convert import make_peft

    import tensorlotr as tlr

    make_peft("llama", tmp_path / "peft")
    exact = tlr.convert_lora(tmp_path / "peft")
    huge = tlr.convert_lora(tmp_path / "peft", rank=100000)
    assert [g.rank for g in huge.groups] == [g.rank for g in exact.groups]
    assert huge.lotr_params == exact.lotr_params
    assert any("above its exact rank" in note for note in huge.notes)
    assert "above its exact rank" in huge.text()
