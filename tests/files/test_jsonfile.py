"""JSON documents (files/jsonfile.py): a file that cannot be read is named in a one-line error."""

from __future__ import annotations

from builders import error_line, run


def test_utf16_config_names_the_file(lora, tmp_path, capsys):
    config = lora / "adapter_config.json"
    config.write_text(config.read_text(), encoding="utf-16")
    assert run(["convert", str(lora), str(tmp_path / "out")]) == 2
    assert f"{config} is not UTF-8 text" in error_line(capsys.readouterr().err, "convert")
