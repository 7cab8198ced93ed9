"""Held-out retention: how much of the original adapter a compressed one keeps, on inputs neither saw.

:func:`evaluate_retention` runs three models on held-out batches: the *head-only* model (the
base with the adapter's ``modules_to_save`` tensors, a trained classification head say, but
no weight updates), the *original* adapter (:class:`~tensorlotr.nn.heal.LoRATeacher`) and the
*compressed* one (:class:`~tensorlotr.LoTRModel`), and compares their outputs (the logits
where the model has them, else the last hidden states):

* ``agreement``: the share of predictions (argmax of the outputs, per sequence for a sequence
  classifier, per real token for a token-level head) equal to the original's;
* ``output_retention``: ``1 - ||y - y_orig|| / ||y_orig - y_head||`` over the held-out outputs,
  the share of the adapter's effect on them that is kept;
* with one label per sequence: the accuracies, and ``retained_gain``
  ``(acc - acc_head) / (acc_orig - acc_head)``, the share of the adapter's gain over the
  head-only model that is kept.

:attr:`Retention.figure` is the one figure a retention target is held to: the retained gain
when there are labels, else the agreement; :attr:`Retention.lower_bound` is that figure less
1.645 of its standard error (a one-sided 95% bound from the normal approximation), which a
target is held on, so that it holds on new inputs too and not only on the sample measured. The
standard errors are those of a mean over the held-out rows (for the retained gain, a ratio of
two paired means, by the delta method); rows are taken as independent, which a language
model's tokens of one sequence are not, so there the bound is optimistic.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from ..adapter import LoTRAdapterFiles
from .heal import Batch, LoRATeacher, _on, _tensor_at
from .model import LoTRModel

__all__ = ["Z_ONE_SIDED_95", "Retention", "evaluate_retention", "model_outputs", "wilson_lower"]

#: Standard errors below the figure of a one-sided 95% lower bound (normal approximation).
Z_ONE_SIDED_95 = 1.645


@dataclass
class Retention:
    """A compressed adapter against its original on held-out inputs (see the module doc).

    ``samples`` counts the held-out outputs compared (``unit``: sequences for a sequence-level
    output, tokens for a token-level one); ``logits`` says whether they are the model's logits
    (else its last hidden states, where an argmax means nothing and the figure without labels
    is the output retention). ``gain_rows`` is the net number of rows the original gets right
    that the head-only model does not (the retained gain's denominator).

    Examples
    --------
    >>> r = Retention(samples=100, agreement=0.97, output_retention=0.9, accuracy_head=0.5, accuracy_original=0.9,
    ...               accuracy=0.88, retained_gain_stderr=0.02, gain_rows=40)
    >>> round(r.retained_gain, 3), round(r.figure, 3), r.figure_name, round(r.lower_bound, 4), r.holds(0.95)
    (0.95, 0.95, 'retained_gain', 0.8597, False)
    >>> Retention(samples=100, agreement=0.97, output_retention=0.9).figure_name
    'agreement'
    >>> round(Retention(samples=30, agreement=1.0, output_retention=1.0).lower_bound, 3)  # all agree: Wilson
    0.917
    """

    samples: int
    agreement: float
    output_retention: float
    accuracy_head: float | None = None
    accuracy_original: float | None = None
    accuracy: float | None = None
    agreement_stderr: float = 0.0
    retained_gain_stderr: float | None = None
    gain_rows: float | None = None
    unit: str = "sequences"
    logits: bool = True

    @property
    def retained_gain(self) -> float | None:
        """``(acc - acc_head) / (acc_orig - acc_head)``; None without labels or when the original gains nothing."""
        if self.accuracy is None or self.accuracy_head is None or self.accuracy_original is None:
            return None
        gain = self.accuracy_original - self.accuracy_head
        return (self.accuracy - self.accuracy_head) / gain if gain > 0 else None

    @property
    def figure_name(self) -> str:
        """``"retained_gain"`` when it is defined, else ``"agreement"`` (``"output_retention"`` without logits)."""
        if self.retained_gain is not None:
            return "retained_gain"
        return "agreement" if self.logits else "output_retention"

    @property
    def figure(self) -> float:
        """The figure a retention target holds: the retained gain, or without labels the agreement."""
        value: float = getattr(self, self.figure_name)
        return value

    @property
    def lower_bound(self) -> float:
        """A one-sided 95% lower bound on :attr:`figure` (``-inf`` from fewer than two rows).

        The lower of two: the figure less 1.645 standard errors (the delta method for the
        retained gain), and the Wilson score bound of a share of as many rows as the figure
        rests on (``gain_rows`` for the retained gain, ``samples`` for the agreement), so that
        a figure with no scatter in its sample (every row agrees) still carries the sample's
        size. The output retention, without logits, has no bound: the figure itself.
        """
        if self.samples < 2:
            return -math.inf
        name = self.figure_name
        if name == "output_retention":
            return self.output_retention
        if name == "retained_gain":
            stderr, rows = self.retained_gain_stderr or 0.0, self.gain_rows or 0.0
        else:
            stderr, rows = self.agreement_stderr, float(self.samples)
        delta = self.figure - Z_ONE_SIDED_95 * stderr
        return min(delta, wilson_lower(min(max(self.figure, 0.0), 1.0), rows))

    def holds(self, target: float) -> bool:
        """Whether the retention holds ``target``: its :attr:`lower_bound` is at least ``target``."""
        return self.lower_bound >= target

    def to_dict(self) -> dict[str, Any]:
        data = {k: v for k, v in asdict(self).items() if v is not None}
        if self.retained_gain is not None:
            data["retained_gain"] = self.retained_gain
        return {**data, "figure": self.figure_name, "lower_bound": self.lower_bound}


def wilson_lower(share: float, rows: float, z: float = Z_ONE_SIDED_95) -> float:
    """The Wilson score lower bound of a share ``share`` of ``rows`` rows (``-inf`` for no rows).

    Examples
    --------
    >>> round(wilson_lower(1.0, 100), 4), round(wilson_lower(0.95, 400), 4)
    (0.9737, 0.9289)
    """
    if rows <= 0:
        return -math.inf
    z2 = z * z
    centre = share + z2 / (2 * rows)
    spread = z * math.sqrt(share * (1 - share) / rows + z2 / (4 * rows * rows))
    return (centre - spread) / (1 + z2 / rows)


@torch.no_grad()
def model_outputs(model: nn.Module, batches: Sequence[Batch]) -> list[torch.Tensor]:
    """Per batch the model's outputs in float32: logits where it has them, else its last hidden states.

    :func:`has_logits` tells which a model gives.

    A sequence classifier gives (B, labels); a token-level output keeps only the real tokens
    (``attention_mask`` 1), (tokens, width).

    Examples
    --------
    >>> import torch
    >>> from transformers import BertConfig, BertForSequenceClassification
    >>> bert = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
    ...                   intermediate_size=48, num_labels=3)
    >>> batches = [{"input_ids": torch.randint(0, 64, (4, 6))}, {"input_ids": torch.randint(0, 64, (2, 5))}]
    >>> [tuple(y.shape) for y in model_outputs(BertForSequenceClassification(bert), batches)]
    [(4, 3), (2, 3)]
    """
    model.eval()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    out = []
    for batch in batches:
        result = model(**_on(batch, device))
        logits = getattr(result, "logits", None)
        hidden = getattr(result, "last_hidden_state", None)
        y = logits if torch.is_tensor(logits) else hidden if torch.is_tensor(hidden) else result[0]
        mask = batch.get("attention_mask")
        if y.ndim == 3 and mask is not None and tuple(mask.shape) == tuple(y.shape[:2]):
            y = y[mask.to(device=y.device, dtype=torch.bool)]
        out.append(y.reshape(-1, y.shape[-1]).float().cpu())
    return out


def has_logits(model: nn.Module, batch: Batch) -> bool:
    """Whether ``model``'s output on ``batch`` has logits (a task head), not only hidden states."""
    with torch.no_grad():
        return torch.is_tensor(getattr(model(**_on(batch, _device(model))), "logits", None))


def _device(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def evaluate_retention(
    base_model: nn.Module,
    files: LoTRAdapterFiles,
    teacher: LoRATeacher,
    batches: Sequence[Batch],
    labels: Sequence[int] | None = None,
) -> Retention:
    """The :class:`Retention` of the compressed adapter ``files`` against ``teacher`` on ``batches``.

    ``labels`` (one per sequence, in the order of the batches) add the accuracies and the
    retained gain; they need a sequence-level output (one prediction per sequence), and are
    left out (``Retention.accuracy`` None) where the outputs are per token. The base model is
    left as it was.

    Examples
    --------
    A LoRA on the two ``query`` layers of a BERT classifier, converted at its exact rank: the
    compressed adapter agrees with it everywhere.

    >>> import torch, peft
    >>> from transformers import BertConfig, BertForSequenceClassification
    >>> from tensorlotr.adapter.lora import lora_to_lotr
    >>> from tensorlotr.io.peft_lora import PeftLoRA
    >>> bert = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
    ...                   intermediate_size=48, num_labels=3)
    >>> _ = torch.manual_seed(0)
    >>> base = BertForSequenceClassification(bert).eval()
    >>> config = peft.LoraConfig(r=2, target_modules=["query"], init_lora_weights=False)
    >>> peft.get_peft_model(BertForSequenceClassification(bert), config).save_pretrained("cls-lora")
    >>> lora = PeftLoRA("cls-lora")
    >>> bs, as_, scales = lora.load(list(lora.modules))
    >>> teacher = LoRATeacher({m: (b, a, s) for m, b, a, s in zip(lora.modules, bs, as_, scales)}, {})
    >>> batches = [{"input_ids": torch.randint(0, 64, (4, 6))} for _ in range(2)]
    >>> result = evaluate_retention(base, lora_to_lotr(lora).files, teacher, batches, labels=[0, 1, 2, 0] * 2)
    >>> result.samples, result.agreement, round(result.output_retention, 2)
    (8, 1.0, 1.0)
    """
    batches = list(batches)
    if not batches:
        raise ValueError("the held-out evaluation needs at least one batch of inputs")
    with LoRATeacher({}, teacher.saved).applied(base_model):
        head = model_outputs(base_model, batches)
        logits = has_logits(base_model, batches[0])
    sequences = sum(int(next(v for v in b.values() if torch.is_tensor(v)).shape[0]) for b in batches)
    rows = sum(int(h.shape[0]) for h in head)
    with teacher.applied(base_model):
        original = model_outputs(base_model, batches)
    with torch.no_grad():
        kept = {key: _tensor_at(base_model, key).detach().clone() for key in files.modules_to_save}
    student = LoTRModel.from_adapter_files(base_model, files, source="the compressed adapter")
    try:
        compressed = model_outputs(student, batches)
    finally:
        student.unload()
        with torch.no_grad():
            for key, value in kept.items():
                _tensor_at(base_model, key).copy_(value)
    y, y0, yh = torch.cat(compressed), torch.cat(original), torch.cat(head)
    effect = float((y0 - yh).norm())
    kept_share = 1.0 - float((y - y0).norm()) / effect if effect > 0 else (1.0 if torch.equal(y, y0) else 0.0)
    agree = (y.argmax(-1) == y0.argmax(-1)).double()
    n = int(y.shape[0])
    retention = Retention(
        samples=n,
        agreement=float(agree.mean()),
        output_retention=kept_share,
        agreement_stderr=float(agree.std(unbiased=True) / math.sqrt(n)) if n > 1 else 0.0,
        unit="sequences" if rows == sequences else "tokens",
        logits=logits,
    )
    if labels is not None and len(labels) != sequences:
        raise ValueError(f"{len(labels)} labels for {sequences} held-out sequences")
    if labels is not None and rows == sequences:
        truth = torch.as_tensor(list(labels))
        head_right, original_right, right = (_correct(o, truth) for o in (yh, y0, y))
        retention.accuracy_head = float(head_right.mean())
        retention.accuracy_original = float(original_right.mean())
        retention.accuracy = float(right.mean())
        retention.retained_gain_stderr = _ratio_stderr(right - head_right, original_right - head_right)
        retention.gain_rows = float((original_right - head_right).sum())
    return retention


def _correct(outputs: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """1.0 where ``outputs``' prediction is ``truth``, per row (float64)."""
    return (outputs.argmax(-1) == truth).double()


def _ratio_stderr(numerator: torch.Tensor, denominator: torch.Tensor) -> float | None:
    """The delta-method standard error of ``sum(numerator) / sum(denominator)`` over paired rows; None if undefined."""
    n, total = int(numerator.shape[0]), float(denominator.sum())
    if n < 2 or total <= 0:
        return None
    ratio = float(numerator.sum()) / total
    residual = numerator - ratio * denominator
    return math.sqrt(n * float(residual.square().sum()) / (n - 1)) / total
