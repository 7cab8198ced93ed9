"""The PEFT and TRL guides' runnable blocks run in order, ``examples/trl_sft.py`` runs, and the package's docstring
examples run; ``tensorlotr.peft`` imports only the layers below it."""

from __future__ import annotations

import ast
import doctest
import importlib
import inspect
import io
import os
import re
import subprocess
import sys

import pytest
from builders import REPO

#: A block runs when the line before its opening fence is ``<!-- runnable -->`` (as in tests/test_readme.py).
_BLOCK = re.compile(r"^<!-- runnable -->\n```python\n(.*?)^```", re.M | re.S)
MODULES = [
    "tensorlotr.peft",
    "tensorlotr.peft.support",
    "tensorlotr.peft.config",
    "tensorlotr.peft.layer",
    "tensorlotr.peft.tuner",
    "tensorlotr.peft.registration",
]
#: The layers tensorlotr.peft may import (it sits above nn/ and below jobs/).
ALLOWED = {"core", "files", "adapter", "io", "nn", "report", "progress", "peft"}


def _minilm_installed() -> bool:
    try:
        from tensorlotr.jobs.demo import default_model_dir

        return (default_model_dir() / "tokenizer.json").is_file()
    except Exception:
        return False


def _run(command: list[str], cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("page", ["docs/peft.md", "docs/trl.md"])
def test_guide_blocks_run_in_order(page, tmp_path):
    blocks = _BLOCK.findall((REPO / page).read_text(encoding="utf-8"))
    assert len(blocks) >= 4, f"{page} has {len(blocks)} runnable blocks"
    if page == "docs/trl.md":
        pytest.importorskip("trl", reason="trl is not installed")
        if not _minilm_installed():
            pytest.skip("the packaged MiniLM tokenizer (tensorlotr[demo]) is not installed")
    done = _run([sys.executable, "-c", "\n".join(blocks)], tmp_path)
    assert done.returncode == 0, f"{page} failed:\n{done.stderr[-4000:]}"


def test_trl_sft_example(tmp_path):
    pytest.importorskip("trl", reason="trl is not installed")
    done = _run(
        [sys.executable, str(REPO / "examples" / "trl_sft.py"), "--workdir", str(tmp_path), "--steps", "4"], tmp_path
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert re.search(r"trainable: [\d,]+ of [\d,]+ parameters \(LoTRTuner\)", done.stdout)
    assert done.stdout.count("base weights saved: none") == 2
    assert "resumed from checkpoint-2 to step 4: max |weight difference| 0.00e+00" in done.stdout
    for loader in ("PeftModel", "AutoPeftModelForCausalLM"):
        assert f"reloaded with {loader}: max |logit difference| = 0.00e+00" in done.stdout
    assert {p.name for p in (tmp_path / "run" / "checkpoint-4").iterdir()} >= {
        "adapter_config.json",
        "adapter_model.safetensors",
    }


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    module = importlib.import_module(name)
    out = io.StringIO()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in doctest.DocTestFinder(exclude_empty=True).find(module, name):
        runner.run(test, out=out.write)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, out.getvalue()
    assert result.attempted > 0
    lacking = [
        attr
        for attr in getattr(module, "__all__", [])
        if (inspect.isfunction(obj := getattr(module, attr)) or inspect.isclass(obj))
        and obj.__module__ == name
        and ">>>" not in (inspect.getdoc(obj) or "")
    ]
    assert not lacking, f"{name}: public names without a docstring example: {lacking}"


def test_the_package_imports_only_the_layers_below_it():
    for path in sorted((REPO / "tensorlotr" / "peft").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                target = (node.module or "").split(".")[0] if node.level == 2 else "peft"
                assert node.level <= 2 and target in ALLOWED, f"{path.name} imports {'.' * node.level}{node.module}"
            elif isinstance(node, ast.ImportFrom | ast.Import):
                names = [node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                for module in names:
                    if module and module.startswith("tensorlotr."):
                        assert module.split(".")[1] in ALLOWED, f"{path.name} imports {module}"
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("core."):
                pytest.fail(f"{path.name} imports tensorlotr.{node.module}; use tensorlotr.core")
