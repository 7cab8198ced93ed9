"""Calibration settings of the jobs: what output-aware compression takes, its inputs, and its error sums.

:class:`Calibration` is the ``calibration=`` of :func:`tensorlotr.convert_lora`,
:func:`tensorlotr.decompose` and :func:`tensorlotr.zoo.compress_zoo`: statistics, or the
tokenized inputs (:func:`tokenized_batches`) and the base model (:func:`load_base_model`) to
collect them with, and the heal's settings. :func:`calibration_from_files` is what the command
line's ``--base-model DIR --calibration-data FILE`` mean. :class:`ErrorSums` add up the weight
and calibrated output errors of some layers (:func:`error_sums`), per group, adapter or in total.

The statistics themselves (:func:`calibrate`, :class:`CalibrationStats`) are collected by the
forward hooks of :mod:`tensorlotr.nn.calibration`; they are importable from here too, and load
the torch bindings on first use, so a job that is not calibrated never loads them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..core import Tucker2, lowrank_norm_sq, relative_error_lowrank, weighted_residuals_lowrank
from ..io import is_lotr_dir, read_adapter
from ..io.peft_lora import CONFIG_NAME as PEFT_CONFIG_NAME
from ..io.peft_lora import PeftLoRA
from ..io.text import read_labelled_texts, read_texts
from ..progress import Progress

if TYPE_CHECKING:
    from ..nn.calibration import CalibrationStats, ModuleStats, calibrate, resolve_modules

__all__ = [
    "Calibration",
    "CalibrationStats",
    "ErrorSums",
    "Evaluation",
    "ModuleStats",
    "as_calibration",
    "calibrate",
    "calibration_from_files",
    "error_sums",
    "load_base_model",
    "read_texts",
    "resolve_modules",
    "tokenized_batches",
]

#: Names of :mod:`tensorlotr.nn.calibration` documented as this module's, imported on first use.
_STATISTICS = ("CalibrationStats", "ModuleStats", "calibrate", "resolve_modules")
#: transformers model classes by PEFT task type, for :func:`load_base_model`.
_AUTO_CLASSES = {
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "CAUSAL_LM": "AutoModelForCausalLM",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
}
#: Names of classification output layers whose rows are the labels.
_HEADS = ("classifier", "score", "out_proj")


def __getattr__(name: str) -> Any:
    if name in _STATISTICS:
        from ..nn import calibration

        return getattr(calibration, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


def tokenized_batches(
    tokenizer: Any, texts: Sequence[str], batch_size: int = 16, max_length: int = 128
) -> list[dict[str, torch.Tensor]]:
    """``texts`` tokenized in batches (padded, truncated to ``max_length`` tokens), as PyTorch tensors.

    Examples
    --------
    >>> from transformers import AutoTokenizer
    >>> from tensorlotr.jobs.demo import default_model_dir
    >>> tokenizer = AutoTokenizer.from_pretrained(str(default_model_dir()))
    >>> batches = tokenized_batches(tokenizer, ["a moving film", "a dull script", "superb"], batch_size=2)
    >>> [tuple(b["input_ids"].shape)[0] for b in batches], sorted(batches[0])
    ([2, 1], ['attention_mask', 'input_ids', 'token_type_ids'])
    """
    if getattr(tokenizer, "pad_token", True) is None:  # GPT-2 style tokenizers have no pad token
        tokenizer.pad_token = tokenizer.eos_token
    return [
        dict(tokenizer(list(texts[i : i + batch_size]), padding=True, truncation=True, max_length=max_length,
                       return_tensors="pt"))
        for i in range(0, len(texts), batch_size)
    ]  # fmt: skip


def load_base_model(
    path: str | os.PathLike[str], task_type: str | None = None, num_labels: int | None = None
) -> tuple[Any, nn.Module]:
    """Tokenizer and model from a local transformers folder, offline.

    ``task_type`` (PEFT's, e.g. ``"SEQ_CLS"``) picks the model class, so module paths match
    the LoRA's; ``num_labels`` sizes a new classification head. Raises ``FileNotFoundError``
    when ``path`` is not a folder with ``config.json``, and ``ValueError`` naming the folder
    when it holds no tokenizer.

    Examples
    --------
    All-MiniLM-L6-v2 with a new 2-label head, as a LoRA trained with ``task_type="SEQ_CLS"`` needs it:

    >>> from tensorlotr.jobs.demo import default_model_dir
    >>> tokenizer, model = load_base_model(default_model_dir(), "SEQ_CLS", num_labels=2)
    >>> type(model).__name__, model.config.num_labels
    ('BertForSequenceClassification', 2)
    """
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} is not a model folder with config.json (the base model is read locally)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers
    from transformers.utils import logging as hf_logging

    auto = getattr(transformers, _AUTO_CLASSES.get(task_type or "", "AutoModel"))
    kwargs = {"num_labels": num_labels} if num_labels is not None and task_type in ("SEQ_CLS", "TOKEN_CLS") else {}
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity(logging.ERROR)  # a new task head is expected to be untrained
    try:
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
        except Exception as exc:  # transformers raises many kinds, none naming the folder
            reason = " ".join(str(exc).split())[:200]
            raise ValueError(
                f"the base model folder {folder} has no tokenizer that transformers can load "
                f"(tokenizer.json, or tokenizer_config.json with its vocabulary files): {reason}"
            ) from None
        model = auto.from_pretrained(str(folder), **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
    return tokenizer, model.eval()


@dataclass
class Evaluation:
    """Held-out inputs to measure a compressed adapter's retention on (:mod:`tensorlotr.nn.evaluate`).

    ``inputs`` are tokenized batches that neither the compression nor the heal sees;
    ``labels`` (one per sequence, in order) add the accuracies and the retained gain.

    Examples
    --------
    >>> import torch
    >>> held = Evaluation([{"input_ids": torch.ones(2, 4, dtype=torch.long)}], labels=[0, 1])
    >>> held.sequences
    2
    >>> Evaluation([{"input_ids": torch.ones(2, 4, dtype=torch.long)}], labels=[0])
    Traceback (most recent call last):
    ...
    ValueError: 1 evaluation labels for 2 sequences
    """

    inputs: Sequence[Mapping[str, Any]]
    labels: Sequence[int] | None = None

    def __post_init__(self) -> None:
        self.inputs = list(self.inputs)
        if not self.inputs:
            raise ValueError("the evaluation needs at least one batch of inputs")
        if self.labels is not None:
            self.labels = [int(y) for y in self.labels]
            if len(self.labels) != self.sequences:
                raise ValueError(f"{len(self.labels)} evaluation labels for {self.sequences} sequences")

    @property
    def sequences(self) -> int:
        """How many sequences the batches hold."""
        return sum(_batch_rows(batch) for batch in self.inputs)


def _batch_rows(batch: Mapping[str, Any]) -> int:
    first = next((v for v in batch.values() if torch.is_tensor(v)), None)
    return int(first.shape[0]) if first is not None else 0


@dataclass
class Calibration:
    """Output-aware compression settings for :func:`tensorlotr.convert_lora` and :func:`tensorlotr.zoo.compress_zoo`.

    Give ``stats`` (from :func:`calibrate`), or ``inputs`` and ``base_model`` to collect them.
    ``heal_steps > 0`` also heals the compressed adapter (:mod:`tensorlotr.heal`) on ``inputs``
    against the original LoRA, which needs ``inputs`` and ``base_model`` in any case.

    Attributes
    ----------
    inputs : sequence of dict, optional
        Tokenized batches (:func:`tokenized_batches`).
    base_model : nn.Module, optional
        The base model without adapters, whose module paths are the LoRA's (a LoRA trained
        with ``task_type="SEQ_CLS"`` needs the sequence-classification model, say).
    stats : CalibrationStats, optional
    samples : int, optional
        Use at most this many sequences of ``inputs``.
    objective : "output" or "weight"
        What the compression minimises: the calibrated output error (``"output"``), or the
        weight error as without calibration (``"weight"``: the statistics then only measure
        the output error, and the inputs serve the heal).
    damping : float
        ``W_l = C_l + damping * trace(C_l) / d_in * I`` (see :func:`tensorlotr.core.tucker2_weighted`).
    n_iter : int
        Weighted HOOI sweeps at most.
    heal_steps, heal_lr, heal_factors, held_out
        :func:`tensorlotr.heal.heal`'s ``steps``, ``lr``, ``train_factors`` and ``held_out``.
    evaluation : Evaluation or dict of str to Evaluation, optional
        Held-out inputs to measure each compressed adapter's retention on (a zoo may give
        each adapter its own, by name). ``None``: the last ``eval_share`` of the ``inputs``
        batches are held out for it, unseen by the statistics and the heal.
    labels : sequence of int, optional
        The labels of the ``inputs``' sequences, in order: the held-out share keeps its own,
        for the retained gain.
    eval_share : float in [0, 1)
        The share of ``inputs`` batches held out when no ``evaluation`` is given (at least
        one batch when there are two or more; 0: no held-out evaluation).

    Examples
    --------
    >>> import torch
    >>> from tensorlotr.nn.calibration import CalibrationStats, ModuleStats
    >>> stats = CalibrationStats({"proj": ModuleStats(3, rows=10, gram=torch.eye(3, dtype=torch.float64))})
    >>> calibration = Calibration(stats=stats, objective="weight")
    >>> calibration.statistics(["proj"]) is stats
    True
    >>> Calibration(stats=stats, heal_steps=10)
    Traceback (most recent call last):
    ...
    ValueError: healing (heal_steps > 0) needs the calibration inputs and the base_model
    """

    inputs: Sequence[Mapping[str, Any]] | None = None
    base_model: nn.Module | None = None
    stats: CalibrationStats | None = None
    samples: int | None = None
    objective: str = "output"
    damping: float = 1e-2
    n_iter: int = 10
    heal_steps: int = 0
    heal_lr: float = 1e-3
    heal_factors: bool = False
    held_out: float = 0.125
    evaluation: Evaluation | dict[str, Evaluation] | None = None
    labels: Sequence[int] | None = None
    eval_share: float = 0.125

    def __post_init__(self) -> None:
        if self.stats is None and (self.inputs is None or self.base_model is None):
            raise ValueError("calibration needs stats, or inputs and a base_model to collect them")
        if self.heal_steps < 0 or not self.heal_lr > 0:
            raise ValueError(f"heal_steps must be >= 0 and heal_lr > 0, got {self.heal_steps} and {self.heal_lr}")
        if self.heal_steps and (self.inputs is None or self.base_model is None):
            raise ValueError("healing (heal_steps > 0) needs the calibration inputs and the base_model")
        if self.objective not in ("output", "weight"):
            raise ValueError(f"objective must be 'output' or 'weight', got {self.objective!r}")
        if self.samples is not None and self.samples < 1:
            raise ValueError(f"samples must be >= 1, got {self.samples}")
        if not 0 <= self.eval_share < 1:
            raise ValueError(f"eval_share must be in [0, 1), got {self.eval_share!r}")
        if self.inputs is not None:
            from ..nn.calibration import first_samples

            self.inputs = list(first_samples(self.inputs, self.samples))
            if self.labels is not None:  # the labels of the sequences kept (samples may keep fewer)
                self.labels = [int(y) for y in self.labels][: sum(_batch_rows(b) for b in self.inputs)]
            if self.evaluation is None and self.eval_share > 0 and len(self.inputs) > 1 and self.base_model is not None:
                self._hold_out()

    def _hold_out(self) -> None:
        """Move the last ``eval_share`` of the input batches (and their labels) to ``evaluation``."""
        assert self.inputs is not None
        inputs = list(self.inputs)
        cut = len(inputs) - min(len(inputs) - 1, max(1, round(self.eval_share * len(inputs))))
        seen = sum(_batch_rows(b) for b in inputs[:cut])
        labels = list(self.labels) if self.labels is not None else None
        total = sum(_batch_rows(b) for b in inputs)
        if labels is not None and len(labels) != total:
            raise ValueError(f"{len(labels)} calibration labels for {total} sequences of the calibration inputs")
        self.evaluation = Evaluation(inputs[cut:], labels[seen:] if labels is not None else None)
        self.inputs = inputs[:cut]
        self.labels = labels[:seen] if labels is not None else None

    def evaluation_for(self, adapter: str | None = None) -> Evaluation | None:
        """The held-out inputs of ``adapter`` (a zoo's member by name), or of the one adapter; None without."""
        if isinstance(self.evaluation, dict):
            return self.evaluation.get(adapter) if adapter is not None else None
        return self.evaluation

    def statistics(self, modules: Sequence[str], progress: Progress | None = None) -> CalibrationStats:
        """The given ``stats`` (checked to cover ``modules``), or :func:`calibrate` on the inputs."""
        if self.stats is None:
            from ..nn.calibration import calibrate

            assert self.inputs is not None and self.base_model is not None
            self.stats = calibrate(self.base_model, self.inputs, modules, progress=progress)
        missing = [m for m in modules if m not in self.stats.modules]
        if missing:
            raise ValueError(f"the calibration statistics lack modules {missing[:3]} of the adapter")
        return self.stats


def as_calibration(value: Calibration | CalibrationStats | None) -> Calibration | None:
    """``calibration=`` of the jobs as a :class:`Calibration` (statistics alone are wrapped).

    Examples
    --------
    >>> import torch
    >>> from tensorlotr.nn.calibration import CalibrationStats, ModuleStats
    >>> stats = CalibrationStats({"proj": ModuleStats(3, rows=10, gram=torch.eye(3, dtype=torch.float64))})
    >>> as_calibration(stats).stats is stats, as_calibration(None)
    (True, None)
    """
    if value is None or isinstance(value, Calibration):
        return value
    from ..nn.calibration import CalibrationStats

    if isinstance(value, CalibrationStats):
        return Calibration(stats=value)
    raise TypeError(f"calibration must be a Calibration or CalibrationStats, got {type(value).__name__}")


@dataclass
class ErrorSums:
    """Squared errors and norms of some layers, to add up per group, adapter or in total.

    ``weight`` / ``weight_ref``: ``sum ||dW_l - U G_l V^T||^2`` and ``sum ||dW_l||^2``;
    ``output`` / ``output_ref``: the same weighted by the calibration, ``||(…) Z_l||^2``
    (None without calibration).

    Examples
    --------
    >>> total = ErrorSums(weight=1.0, weight_ref=4.0) + ErrorSums(weight=0.0, weight_ref=12.0)
    >>> total.weight_error, total.output_error
    (0.25, None)
    """

    weight: float = 0.0
    weight_ref: float = 0.0
    output: float | None = None
    output_ref: float | None = None

    def __add__(self, other: ErrorSums) -> ErrorSums:
        def add(a: float | None, b: float | None) -> float | None:
            return None if a is None and b is None else (a or 0.0) + (b or 0.0)

        return ErrorSums(
            self.weight + other.weight,
            self.weight_ref + other.weight_ref,
            add(self.output, other.output),
            add(self.output_ref, other.output_ref),
        )

    @property
    def weight_error(self) -> float:
        """The relative weight error (0 when the updates are zero)."""
        return (self.weight / self.weight_ref) ** 0.5 if self.weight_ref > 0 else 0.0

    @property
    def output_error(self) -> float | None:
        """The relative calibrated output error, or None without calibration."""
        if self.output is None or self.output_ref is None:
            return None
        return (self.output / self.output_ref) ** 0.5 if self.output_ref > 0 else 0.0


def error_sums(
    tucker: Tucker2,
    bs: Sequence[torch.Tensor],
    as_: Sequence[torch.Tensor],
    scales: Sequence[float],
    factors: Sequence[torch.Tensor] | None = None,
) -> ErrorSums:
    """The :class:`ErrorSums` of ``tucker`` against LoRA layers ``s_l B_l A_l``, weighted by ``factors`` (``Z_l``).

    Exact, in float64, never forming a ``d_out x d_in`` matrix.

    Examples
    --------
    Three LoRA layers ``B_l`` (6, 2), ``A_l`` (2, 5) and their exact Tucker-2; with calibration
    factors ``Z_l = I`` the output error is the weight error:

    >>> import torch
    >>> from tensorlotr.core import tucker2_lowrank
    >>> bs = [torch.randn(6, 2, dtype=torch.float64) for _ in range(3)]
    >>> as_ = [torch.randn(2, 5, dtype=torch.float64) for _ in range(3)]
    >>> sums = error_sums(tucker2_lowrank(bs, as_), bs, as_, [1.0] * 3, [torch.eye(5, dtype=torch.float64)] * 3)
    >>> sums.weight_error < 1e-10, sums.output_error < 1e-10
    (True, True)
    """
    bs = [b.double() for b in bs]
    as_ = [a.double() for a in as_]
    tucker = Tucker2(*(torch.as_tensor(x).double() for x in tucker))
    ref = lowrank_norm_sq(bs, as_, list(scales))
    sums = ErrorSums(relative_error_lowrank(tucker, bs, as_, list(scales)) ** 2 * ref, ref)
    if factors is not None:
        res, out_ref = weighted_residuals_lowrank(tucker, bs, as_, list(factors), list(scales))
        sums.output, sums.output_ref = float(res.sum()), float(out_ref.sum())
    return sums


def _head_of(folder: Path) -> tuple[str | None, int | None]:
    """PEFT's task type of the adapter in ``folder`` and, for a classification head it saves, its number of labels."""
    if (folder / PEFT_CONFIG_NAME).is_file() and not is_lotr_dir(folder):  # a LoTR one is PEFT's format too
        lora = PeftLoRA(folder)
        task, saved = lora.config.get("task_type"), lora.load_modules_to_save()
    elif is_lotr_dir(folder):
        files = read_adapter(folder)
        task, saved = files.config.get("task_type") or files.base_model.get("task_type"), files.modules_to_save
    else:
        return None, None
    heads = [t for k, t in saved.items() if k.endswith(".weight") and t.ndim == 2 and k.split(".")[-2] in _HEADS]
    return task, int(heads[0].shape[0]) if heads else None


def calibration_from_files(
    base_model: str | os.PathLike[str],
    data: str | os.PathLike[str],
    adapter: str | os.PathLike[str],
    *,
    samples: int = 256,
    batch_size: int = 16,
    max_length: int = 128,
    heal_steps: int = 0,
    heal_lr: float = 1e-3,
    heal_factors: bool = False,
    objective: str = "output",
    eval_data: str | os.PathLike[str] | Mapping[str, str | os.PathLike[str]] | None = None,
) -> Calibration:
    """What the command line's ``--base-model DIR --calibration-data FILE [--eval-data FILE]`` mean.

    The base model is loaded from the local folder ``base_model`` with the class that the
    adapter in ``adapter`` (a PEFT LoRA or LoTR folder) was trained on (its ``task_type``)
    and, for a saved classification head, its number of labels; the first ``samples`` texts
    of ``data`` (:func:`read_texts`) are tokenized in batches of ``batch_size``. The last
    eighth of them are held out for the retention evaluation, unless ``eval_data`` gives the
    held-out texts (all of it, tokenized alike), or, for a zoo, each adapter's own by name; a
    TSV with integer labels in its second column gives the labels too, for the retained gain.

    Examples
    --------
    ``my-lora/`` holds a PEFT LoRA saved without a task type, so the base model is loaded as
    the bare ``AutoModel``; of two batches of one text, the second is held out:

    >>> from pathlib import Path
    >>> from tensorlotr.jobs.demo import default_model_dir
    >>> _ = Path("texts.txt").write_text("a moving film\\na dull script\\nthe ending was superb\\n")
    >>> calibration = calibration_from_files(default_model_dir(), "texts.txt", "my-lora", samples=2, batch_size=1)
    >>> len(calibration.inputs), len(calibration.evaluation.inputs), type(calibration.base_model).__name__
    (1, 1, 'BertModel')
    """
    texts, labels = read_labelled_texts(data, limit=samples)  # first: a missing file is named before any model loads
    files = eval_data if isinstance(eval_data, Mapping) else {"": eval_data} if eval_data is not None else {}
    held = {name: read_labelled_texts(path) for name, path in files.items()}
    task, num_labels = _head_of(Path(adapter))
    tokenizer, model = load_base_model(base_model, task, num_labels)
    per_name = {
        name: Evaluation(tokenized_batches(tokenizer, texts, batch_size, max_length), labels)
        for name, (texts, labels) in held.items()
    }
    evaluation = per_name.get("") if not isinstance(eval_data, Mapping) else per_name
    return Calibration(
        inputs=tokenized_batches(tokenizer, texts, batch_size, max_length), base_model=model,
        heal_steps=heal_steps, heal_lr=heal_lr, heal_factors=heal_factors, objective=objective,
        evaluation=evaluation, labels=labels,
    )  # fmt: skip
