"""The demo job (jobs/demo.py): a missing or empty model folder is a clear error (its run: e2e/test_minilm.py)."""

from __future__ import annotations

from builders import error_line, run


def test_demo_with_a_missing_model_folder_is_a_clear_error(tmp_path, capsys):
    assert run(["demo", "--model", str(tmp_path / "nope")]) == 2
    assert str(tmp_path / "nope") in error_line(capsys.readouterr().err, "demo")
    (tmp_path / "empty").mkdir()
    assert run(["demo", "--model", str(tmp_path / "empty")]) == 2
    assert "config.json" in error_line(capsys.readouterr().err, "demo")
