"""Held-out retention of the jobs: a compressed adapter measured against its LoRA on inputs no fit saw.

:func:`held_out_retention` is what convert and the zoo call after compressing (and healing):
the calibration's :class:`~tensorlotr.jobs.calibration.Evaluation` (its held-out share, or
``--eval-data``) run through :func:`tensorlotr.nn.evaluate.evaluate_retention`.
:func:`check_min_retention` refuses a retention target the jobs cannot measure.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..adapter import LoTRAdapterFiles
from .calibration import Calibration

if TYPE_CHECKING:
    from ..nn.evaluate import Retention

__all__ = ["check_min_retention", "held_out_retention", "retention_note"]

Updates = dict[str, tuple[torch.Tensor, torch.Tensor, float]]


def check_min_retention(min_retention: float | None, cal: Calibration | None) -> None:
    """Refuse ``min_retention`` outside (0, 1], or without held-out inputs to hold it on.

    Examples
    --------
    >>> check_min_retention(None, None)
    >>> check_min_retention(0.95, None)
    Traceback (most recent call last):
    ...
    ValueError: min_retention is held on held-out inputs: give the base model and calibration inputs of two batches \
or more (--base-model and --calibration-data, whose last eighth is held out), or evaluation data (--eval-data)
    """
    if min_retention is None:
        return
    if isinstance(min_retention, bool) or not 0.0 < float(min_retention) <= 1.0:
        raise ValueError(f"min_retention must be in (0, 1], got {min_retention!r}")
    if cal is None or cal.base_model is None or cal.evaluation_for(None) is None:
        raise ValueError(
            "min_retention is held on held-out inputs: give the base model and calibration inputs of two batches "
            "or more (--base-model and --calibration-data, whose last eighth is held out), or evaluation data "
            "(--eval-data)"
        )


def held_out_retention(
    cal: Calibration | None,
    files: LoTRAdapterFiles,
    updates: Updates,
    saved: dict[str, torch.Tensor],
    adapter: str | None = None,
) -> Retention | None:
    """``files`` against the LoRA ``updates`` (module -> ``(B, A, s)``) and ``saved`` tensors on the held-out inputs.

    None when the calibration has no held-out inputs for ``adapter`` (or no base model).
    Labels of a token-level output (a language model's) are left out: the agreement and
    the output retention still count.

    Examples
    --------
    A LoRA on the ``query`` layers of a BERT classifier against its exact conversion:

    >>> import peft
    >>> from transformers import BertConfig, BertForSequenceClassification
    >>> from tensorlotr.adapter.lora import lora_to_lotr
    >>> from tensorlotr.io.peft_lora import PeftLoRA
    >>> from tensorlotr.jobs.calibration import Evaluation
    >>> bert = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
    ...                   intermediate_size=48)
    >>> config = peft.LoraConfig(r=2, target_modules=["query"], init_lora_weights=False)
    >>> peft.get_peft_model(BertForSequenceClassification(bert), config).save_pretrained("held-lora")
    >>> lora = PeftLoRA("held-lora")
    >>> updates = dict(zip(lora.modules, zip(*lora.load(list(lora.modules)))))
    >>> batches = [{"input_ids": torch.randint(0, 64, (4, 6))} for _ in range(2)]
    >>> cal = Calibration(inputs=batches, base_model=BertForSequenceClassification(bert).eval(),
    ...                   evaluation=Evaluation(batches))
    >>> held_out_retention(cal, lora_to_lotr(lora).files, updates, {}).agreement
    1.0
    >>> held_out_retention(None, lora_to_lotr(lora).files, updates, {}) is None
    True
    """
    if cal is None or cal.base_model is None:
        return None
    evaluation = cal.evaluation_for(adapter)
    if evaluation is None:
        return None
    from ..nn.evaluate import evaluate_retention
    from ..nn.heal import LoRATeacher

    teacher = LoRATeacher({m: (b.float(), a.float(), s) for m, (b, a, s) in updates.items()}, saved)
    return evaluate_retention(cal.base_model, files, teacher, evaluation.inputs, evaluation.labels)


def retention_note(who: str, retention: Retention, min_retention: float | None = None) -> str:
    """One line of a report on ``who``'s held-out retention (and whether it holds ``min_retention``).

    Examples
    --------
    >>> from tensorlotr.nn.evaluate import Retention
    >>> r = Retention(samples=320, agreement=0.97, output_retention=0.91, accuracy_head=0.5, accuracy_original=0.9,
    ...               accuracy=0.88, retained_gain_stderr=0.02, gain_rows=128)
    >>> print(retention_note("the adapter", r, 0.9))  # doctest: +NORMALIZE_WHITESPACE
    the adapter on 320 held-out sequences: agreement 97.0%, output retained 91.0%, retained gain 95.0%
    (95% lower bound 90.8% >= 90%: held)
    """
    text = (
        f"{who} on {retention.samples} held-out {retention.unit}: agreement {retention.agreement:.1%}, "
        f"output retained {retention.output_retention:.1%}"
    )
    if retention.retained_gain is not None:
        text += f", retained gain {retention.retained_gain:.1%}"
    if min_retention is not None:
        verdict = "held" if retention.holds(min_retention) else "NOT held"
        text += f" (95% lower bound {retention.lower_bound:.1%} >= {min_retention:.0%}: {verdict})"
    return text
