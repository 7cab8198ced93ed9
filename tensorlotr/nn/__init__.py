"""Torch bindings: LoTR adapters on transformers models. No file formats live here."""

from typing import Any

from ..adapter import LoTRConfig
from .layer import LoTRFactors, LoTRLayer
from .model import LoTRModel, LoTRReferenceModel, get_lotr_model
from .saving import get_peft_model_state_dict, hotswap_adapter, set_peft_model_state_dict

__all__ = [
    "LoTRConfig",
    "LoTRFactors",
    "LoTRLayer",
    "LoTRModel",
    "LoTRReferenceModel",
    "LoTRTrainer",
    "get_lotr_model",
    "get_peft_model_state_dict",
    "hotswap_adapter",
    "set_peft_model_state_dict",
]


def __getattr__(name: str) -> Any:
    if name == "LoTRTrainer":  # importing transformers.Trainer takes seconds; only on demand
        from .trainer import LoTRTrainer

        return LoTRTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
