"""``LoTRTrainer``: ``transformers.Trainer`` whose checkpoints are adapter folders.

A plain ``Trainer`` trains a :class:`LoTRModel` too and checkpoints the adapter only: it
saves a model that is no ``PreTrainedModel`` as its ``state_dict()``, which for a
``LoTRModel`` holds the adapters' tensors alone (never the base weights, so tied embeddings
are no trouble), in ``model.safetensors``, and resumes from it. ``LoTRTrainer`` writes the
adapter folder instead (``adapter_config.json`` and ``adapter_model.safetensors``, which
``LoTRModel.from_pretrained`` and ``peft.PeftModel.from_pretrained`` load), through the
``_save`` override that ``Trainer.save_model`` calls; it takes the label names from the base
model's class, reloads the best adapter at the end of training with a callback
(``load_best_model_at_end``), and resumes from adapter checkpoints.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.utils import generic as hf_generic

from ..io import is_lotr_dir
from .model import LoTRModel

TRAINING_ARGS_NAME = "training_args.bin"
#: transformers' readers of a model class's forward: the label arguments it names, and whether it can return a loss.
find_labels: Callable[[type], list[str]] = hf_generic.find_labels
can_return_loss: Callable[[type], bool] = hf_generic.can_return_loss
_NO_BEST_MODEL = re.compile(r"Could not locate the best model at (?P<path>.+?), if you are running")


class _LoTRBestModelFilter(logging.Filter):
    """Drop ``Trainer``'s "Could not locate the best model" warning for LoTR adapter checkpoints.

    ``Trainer._load_best_model`` looks for full weights only and warns before
    :class:`LoadBestAdapterCallback` loads the adapter; the warning would say the opposite
    of what happens.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        found = _NO_BEST_MODEL.match(record.getMessage())
        return found is None or not is_lotr_dir(os.path.dirname(found.group("path")))


logging.getLogger("transformers.trainer").addFilter(_LoTRBestModelFilter())


def _as_lotr(model: Any) -> LoTRModel | None:
    return model if isinstance(model, LoTRModel) else None


class LoadBestAdapterCallback(TrainerCallback):
    """At the end of training, load the adapter of ``state.best_model_checkpoint`` (``load_best_model_at_end``).

    ``Trainer`` itself only reloads full weights or PEFT adapters; this callback reloads a
    LoTR adapter checkpoint into the trained :class:`LoTRModel`, on every process.
    """

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model: Any = None, **_: Any
    ) -> None:
        lotr = _as_lotr(model)
        best = state.best_model_checkpoint
        if lotr is not None and args.load_best_model_at_end and best is not None and is_lotr_dir(best):
            lotr.load_adapter(best)


class LoTRTrainer(Trainer):
    """``transformers.Trainer`` whose checkpoints are LoTR adapter folders, not the base model.

    It takes ``transformers.Trainer``'s arguments. Each checkpoint holds ``adapter_config.json``,
    ``adapter_model.safetensors`` (per group ``U`` (d_out, r_out), ``V`` (d_in, r_in) and a
    (r_out, r_in) core per layer, plus the ``modules_to_save``), a model card, the tokenizer
    when one is given, and ``Trainer``'s optimizer, scheduler and state files: a folder that
    ``LoTRModel.from_pretrained`` and ``peft.PeftModel.from_pretrained`` load as it is.

    Examples
    --------
    Two steps on 16 random sequences of 8 tokens, with a 2-layer BERT classifier of hidden
    size 32:

    >>> import torch
    >>> from transformers import BertConfig, BertForSequenceClassification, TrainingArguments
    >>> from tensorlotr import LoTRConfig, LoTRTrainer, get_lotr_model
    >>> bert = BertConfig(
    ...     vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48
    ... )
    >>> config = LoTRConfig(rank=4, target_modules=["query", "value"], modules_to_save=["classifier"])
    >>> lotr = get_lotr_model(BertForSequenceClassification(bert), config)
    >>> train = [{"input_ids": torch.randint(64, (8,)), "labels": i % 2} for i in range(16)]
    >>> args = TrainingArguments(
    ...     "checkpoints", max_steps=2, per_device_train_batch_size=8, save_steps=2, report_to=[], use_cpu=True,
    ...     disable_tqdm=True,
    ... )
    >>> trainer = LoTRTrainer(model=lotr, args=args, train_dataset=train)
    >>> trainer.train().global_step  # Trainer prints its last log line first
    {...}
    2
    >>> from pathlib import Path
    >>> sorted(p.name for p in Path("checkpoints/checkpoint-2").iterdir())
    ['README.md', 'adapter_config.json', 'adapter_model.safetensors', 'optimizer.pt', 'rng_state.pth',
     'scheduler.pt', 'trainer_state.json', 'training_args.bin']
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        lotr = self._lotr_model()
        if lotr is not None:
            base = type(lotr.get_base_model())  # its forward names the labels: start_positions for QA, say
            if self.args.label_names is None:
                self.label_names = find_labels(base)
            self.can_return_loss = can_return_loss(base)
            self.add_callback(LoadBestAdapterCallback())

    def _lotr_model(self, model: Any = None) -> LoTRModel | None:
        return _as_lotr(self.accelerator.unwrap_model(model if model is not None else self.model))

    def _save(self, output_dir: str | None = None, state_dict: dict[str, Any] | None = None) -> None:
        """Write the adapter, the processing class and the training arguments into ``output_dir``.

        Every process calls this (``Trainer.save_model``); only the one that ``should_save`` writes.
        DeepSpeed and FSDP runs through ``Trainer``'s plugins keep ``Trainer``'s own saving.
        """
        lotr = self._lotr_model()
        if lotr is None or self.is_deepspeed_enabled or self.is_fsdp_enabled:
            return super()._save(output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if output_dir is None:
            raise ValueError("LoTRTrainer needs an output_dir to save the adapter in")
        lotr.save_pretrained(output_dir, is_main_process=self.args.should_save)
        if not self.args.should_save:
            return None
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))
        return None

    def _load_best_model(self) -> None:
        """Leave a LoTR adapter checkpoint to :class:`LoadBestAdapterCallback`; others go to ``Trainer``.

        ``Trainer._load_best_model`` loads ``adapter_model.safetensors`` only into a ``PeftModel``
        and otherwise looks for full weights (``pytorch_model.bin``), which an adapter folder lacks.
        """
        best = self.state.best_model_checkpoint
        if self._lotr_model() is not None and best is not None and is_lotr_dir(best):
            return
        super()._load_best_model()

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        """Resume from an adapter checkpoint.

        ``Trainer.train(resume_from_checkpoint=...)`` calls this before any callback runs, and
        ``Trainer``'s own version refuses a folder without full weights, so no public hook can
        do it; other checkpoints go to ``Trainer``.
        """
        lotr = self._lotr_model(model)
        if lotr is not None and is_lotr_dir(resume_from_checkpoint):
            lotr.load_adapter(resume_from_checkpoint)
            return
        super()._load_from_checkpoint(resume_from_checkpoint, model)
