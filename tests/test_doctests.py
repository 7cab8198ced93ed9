"""The examples in the docstrings run as written (doctest), and every public name has one."""

from __future__ import annotations

import doctest
import functools
import importlib
import inspect
import io

import pytest

#: Modules whose docstring examples run here. Each runs in an empty working directory, with
#: ``HF_HUB_OFFLINE=1``; the examples of the modules in :data:`FIXTURES` find there what a
#: user would have: a PEFT LoRA folder ``my-lora/``, a tree of TensorBoard runs ``runs/``.
MODULES = [
    "tensorlotr",
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
    "tensorlotr.jobs.convert",
    "tensorlotr.jobs.export",
    "tensorlotr.jobs.inspect",
    "tensorlotr.nn.model",
    "tensorlotr.nn.layer",
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


def tiny_llama(seed: int = 0):
    """A 2-layer Llama of hidden size 32, built from a config."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=32,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def tiny_peft_lora(folder, seed: int = 0) -> None:
    """A rank-4 PEFT LoRA on q_proj and v_proj of :func:`tiny_llama`, saved in ``folder``."""
    import torch
    from peft import LoraConfig, get_peft_model

    base = tiny_llama()
    torch.manual_seed(seed)
    lora = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lora.save_pretrained(folder)


def tiny_runs(folder) -> None:
    """Three TensorBoard runs ``folder/sst2/lotr/<lr>/<seed>/`` (lr 1e-4 seeds 0 and 1, lr 3e-4 seed 0),
    each logging ``train/loss`` = 1 / (step + 1) at steps 0 to 4."""
    from torch.utils.tensorboard import SummaryWriter

    for lr, seed in (("1e-4", 0), ("1e-4", 1), ("3e-4", 0)):
        with SummaryWriter(str(folder / "sst2" / "lotr" / lr / str(seed))) as writer:
            for step in range(5):
                writer.add_scalar("train/loss", 1.0 / (step + 1), step)


#: Two LoRAs of one base (:func:`tiny_peft_lora` with seeds 0 and 1), for the zoo's examples.
TWO_LORAS = [("lora-a", tiny_peft_lora), ("lora-b", functools.partial(tiny_peft_lora, seed=1))]

#: What the examples of a module find in their working directory, by module.
FIXTURES = {
    "tensorlotr.jobs.convert": [("my-lora", tiny_peft_lora)],
    "tensorlotr.jobs.export": [("my-lora", tiny_peft_lora)],
    "tensorlotr.jobs.inspect": [("my-lora", tiny_peft_lora)],
    "tensorlotr.nn.model": [("my-lora", tiny_peft_lora)],
    "tensorlotr.cli.main": [("my-lora", tiny_peft_lora)],
    "tensorlotr.jobs.logs": [("runs", tiny_runs)],
    "tensorlotr.jobs.calibration": [("my-lora", tiny_peft_lora)],
    "tensorlotr.jobs.zoo.sources": [("my-lora", tiny_peft_lora)],
    **{f"tensorlotr.jobs.zoo.{job}": TWO_LORAS for job in ("fit", "compress", "add", "inspect", "heal")},
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
