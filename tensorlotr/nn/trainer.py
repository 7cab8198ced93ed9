"""``LoTRTrainer``: ``transformers.Trainer`` that checkpoints the adapter only.

A plain ``Trainer`` trains a :class:`LoTRModel` too, but it saves the model's full state
dict at each checkpoint (and safetensors refuses tied weights, as in GPT-2's LM head).
``LoTRTrainer`` writes ``lotr_config.json`` and ``lotr_model.safetensors`` instead, and
resumes from them.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from transformers import Trainer

from ..io import is_lotr_dir
from .model import LoTRModel

TRAINING_ARGS_NAME = "training_args.bin"


class LoTRTrainer(Trainer):
    """``transformers.Trainer`` whose checkpoints hold the LoTR adapter, not the base model."""

    def _lotr_model(self, model: Any = None) -> LoTRModel | None:
        model = self.accelerator.unwrap_model(model if model is not None else self.model)
        return model if isinstance(model, LoTRModel) else None

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        lotr = self._lotr_model()
        if lotr is None or self.is_deepspeed_enabled or self.is_fsdp_enabled:
            return super().save_model(output_dir, _internal_call)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return None
        lotr.save_pretrained(output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))
        return None

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        lotr = self._lotr_model(model)
        if lotr is not None and is_lotr_dir(resume_from_checkpoint):
            lotr.load_adapter(resume_from_checkpoint)
            return
        super()._load_from_checkpoint(resume_from_checkpoint, model)
