"""The runnable blocks of the README and of docs/getting-started.md run as written, at tiny size.

A block is runnable when the line before its opening fence is ``<!-- runnable -->``; a block
that repeats an earlier one runs once. Each runs in a fresh working directory that holds
what the commands name, as a user's checkout would after ``make test``: ``.venv`` (this
interpreter's environment) and :func:`builders.write_doc_fixtures`' folders: ``my-lora/`` and
``lora-a/`` to ``lora-e/`` (PEFT LoRAs), ``base/`` and ``finetuned/`` (model folders) and
``runs/`` (TensorBoard runs, six path segments deep).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest
from builders import REPO, write_doc_fixtures

DOCUMENTS = ["README.md", "docs/getting-started.md"]
_BLOCK = re.compile(r"^<!-- runnable -->\n```(bash|python)\n(.*?)^```", re.M | re.S)


def runnable_blocks(document: str) -> list[tuple[str, str]]:
    """``(language, code)`` of each block marked runnable in ``document``."""
    return _BLOCK.findall((REPO / document).read_text(encoding="utf-8"))


BLOCKS: list[tuple[str, str, str]] = []
for _doc in DOCUMENTS:
    BLOCKS += [(_doc, lang, code) for lang, code in runnable_blocks(_doc) if code not in {c for *_, c in BLOCKS}]


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    root = tmp_path_factory.mktemp("readme-fixtures")
    write_doc_fixtures(root)
    return root


def test_every_job_has_a_runnable_readme_command():
    code = "\n".join(code for doc, _, code in BLOCKS if doc == "README.md")
    for job in ("inspect", "convert", "export-lora", "decompose", "zoo compress", "tb2parquet"):
        assert f".venv/bin/tensorlotr {job} " in code, job
    for name in ("get_lotr_model", "save_pretrained", "from_pretrained", "tucker2_lowrank"):
        assert name in code, name


@pytest.mark.slow
@pytest.mark.parametrize(
    ("document", "language", "code"), BLOCKS, ids=[f"{d}:{i}" for i, (d, _, _) in enumerate(BLOCKS)]
)
def test_runnable_block_runs_as_written(document, language, code, fixtures, tmp_path):
    work = tmp_path / "checkout"
    shutil.copytree(fixtures, work)
    (work / ".venv").symlink_to(sys.prefix)  # .venv/bin/tensorlotr and .venv/bin/python, as after make test
    command = ["bash", "-euo", "pipefail", "-c", code] if language == "bash" else [sys.executable, "-c", code]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{document} block failed:\n{code}\n--- stderr ---\n{done.stderr[-4000:]}"
