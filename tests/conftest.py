"""Test settings (offline, one thread, hypothesis' profile) and the fixtures shared by the test folders.

The fixtures are built with :mod:`builders`, which also holds the tiny models and helpers the
tests import.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path

import pytest
import torch
from builders import BERT_LORA, model_pair, peft_lora, tiny_bert, write_lora, write_lora_pair
from hypothesis import HealthCheck, settings

torch.set_num_threads(1)  # tests run in parallel workers on 2 cores

settings.register_profile("default", deadline=None, max_examples=25, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture()
def lora(tmp_path: Path) -> Path:
    """``tmp_path/lora``: the command-line tests' PEFT LoRA of the tiny Llama (:func:`builders.write_lora`)."""
    write_lora(tmp_path / "lora")
    return tmp_path / "lora"


@pytest.fixture()
def pair(tmp_path: Path) -> Path:
    """``base/`` and ``ft/`` model folders (sharded safetensors) in ``tmp_path``; ft has q_proj updates."""
    return model_pair(tmp_path)


@pytest.fixture(scope="session")
def peft_pair(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two PEFT LoRAs of one tiny Llama, each saved, and each converted exactly to LoTR (read only)."""
    return write_lora_pair(tmp_path_factory.mktemp("pair"))


@pytest.fixture(scope="module")
def bert_lora(tmp_path_factory: pytest.TempPathFactory):
    """A PEFT LoRA with random factors and a trained head, its PEFT model, and its LoTR conversion at rank 2."""
    from tensorlotr.jobs.convert import convert_lora

    folder = tmp_path_factory.mktemp("heal")
    peft_model = peft_lora(folder / "peft", tiny_bert(0), seed=7, **BERT_LORA)
    convert_lora(folder / "peft", folder / "lotr", rank=2)
    return folder, peft_model


@pytest.fixture()
def fresh_dynamo():
    """torch.compile's caches emptied before and after the test."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
