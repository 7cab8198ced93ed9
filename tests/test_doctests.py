"""The examples in the docstrings run as written (doctest), and every public name has one."""

from __future__ import annotations

import doctest
import functools
import importlib
import inspect
import io

import pytest
from builders import tiny_peft_lora, tiny_runs

#: Modules whose docstring examples run here. Each runs in an empty working directory, with
#: ``HF_HUB_OFFLINE=1``; the examples of the modules in :data:`FIXTURES` find there what a
#: user would have: a PEFT LoRA folder ``my-lora/``, a tree of TensorBoard runs ``runs/``.
MODULES = [
    "tensorlotr",
    "tensorlotr.core.backend",
    "tensorlotr.core.range_finder",
    "tensorlotr.progress",
    "tensorlotr.adapter.config",
    "tensorlotr.adapter.groups",
    "tensorlotr.adapter.layout",
    "tensorlotr.adapter.lora",
    "tensorlotr.report",
    "tensorlotr.jobs.driver",
    "tensorlotr.nn.optim",
    "tensorlotr.jobs.data",
    "tensorlotr.io.text",
    "tensorlotr.nn.calibration",
    "tensorlotr.jobs.calibration",
    "tensorlotr.jobs.compression_report",
    "tensorlotr.jobs.zoo.sources",
    "tensorlotr.jobs.zoo.fit",
    "tensorlotr.jobs.zoo.report",
    "tensorlotr.jobs.zoo.compress",
    "tensorlotr.jobs.zoo.add",
    "tensorlotr.jobs.zoo.inspect",
    "tensorlotr.jobs.zoo.heal",
    "tensorlotr.jobs.zoo.residual",
    "tensorlotr.jobs.retention",
    "tensorlotr.nn.evaluate",
    "tensorlotr.jobs.convert",
    "tensorlotr.jobs.export",
    "tensorlotr.jobs.inspect",
    "tensorlotr.nn.model",
    "tensorlotr.nn.pretrained",
    "tensorlotr.nn.status",
    "tensorlotr.nn.combine",
    "tensorlotr.nn.reference",
    "tensorlotr.nn.layer",
    "tensorlotr.nn.targets",
    "tensorlotr.nn.from_peft",
    "tensorlotr.nn.planner",
    "tensorlotr.nn.sharing",
    "tensorlotr.nn.modules_to_save",
    "tensorlotr.nn.saving",
    "tensorlotr.nn.trainer",
    "tensorlotr.io.lotr_format",
    "tensorlotr.io.peft_lotr",
    "tensorlotr.files.atomic",
    "tensorlotr.files.lock",
    "tensorlotr.files.siblings",
    "tensorlotr.files.hub",
    "tensorlotr.io.zoo_format",
    "tensorlotr.io.checkpoint",
    "tensorlotr.io.original_format",
    "tensorlotr.jobs.original",
    "tensorlotr.io.model_card",
    "tensorlotr.jobs.logs",
    "tensorlotr.jobs.decompose",
    "tensorlotr.cli.main",
    "tensorlotr.jobs.demo",
]


#: Two LoRAs of one base (:func:`tiny_peft_lora` with seeds 0 and 1), for the zoo's examples.
TWO_LORAS = [("lora-a", tiny_peft_lora), ("lora-b", functools.partial(tiny_peft_lora, seed=1))]

#: What the examples of a module find in their working directory, by module.
FIXTURES = {
    "tensorlotr.jobs.convert": [("my-lora", tiny_peft_lora)],
    "tensorlotr.jobs.export": [("my-lora", tiny_peft_lora)],
    "tensorlotr.jobs.inspect": [("my-lora", tiny_peft_lora)],
    "tensorlotr.nn.model": [("my-lora", tiny_peft_lora)],
    "tensorlotr.nn.pretrained": [("my-lora", tiny_peft_lora)],
    "tensorlotr.cli.main": [("my-lora", tiny_peft_lora)],
    "tensorlotr.jobs.logs": [("runs", tiny_runs)],
    "tensorlotr.jobs.calibration": [("my-lora", tiny_peft_lora)],
    "tensorlotr.jobs.zoo.sources": [("my-lora", tiny_peft_lora)],
    **{f"tensorlotr.jobs.zoo.{job}": TWO_LORAS for job in ("fit", "compress", "add", "inspect", "heal", "residual")},
}


def run_examples(name: str) -> doctest.TestResults:
    module = importlib.import_module(name)
    out = io.StringIO()
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in finder.find(module, name):
        runner.run(test, out=out.write)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, out.getvalue()
    return result


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # restored afterwards, whatever an example sets
    for folder, write in FIXTURES.get(name, []):
        write(tmp_path / folder)
    assert run_examples(name).attempted > 0


def _public(name: str) -> list[tuple[str, object]]:
    """Public functions and classes defined in module ``name``: in its ``__all__``, else in its
    package's (``tensorlotr.adapter.config`` is public through ``tensorlotr.adapter``), else
    every name without a leading underscore."""
    module = importlib.import_module(name)
    package = importlib.import_module(name.rsplit(".", 1)[0])
    exported = (
        getattr(module, "__all__", None)
        or (package.__name__ != "tensorlotr" and getattr(package, "__all__", None))
        or None
    )
    return [
        (attr, obj)
        for attr, obj in vars(module).items()
        if (attr in exported if exported else not attr.startswith("_"))
        and (inspect.isfunction(obj) or inspect.isclass(obj))
        and getattr(obj, "__module__", None) == name
    ]


@pytest.mark.parametrize("name", MODULES[1:])
def test_public_names_have_examples(name):
    lacking = [attr for attr, obj in _public(name) if ">>>" not in (inspect.getdoc(obj) or "")]
    assert not lacking, f"{name}: public names without a docstring example: {lacking}"
