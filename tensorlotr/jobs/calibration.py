"""Calibration statistics: the second moment of each target module's inputs on real data.

:func:`calibrate` runs a base model (any transformers model, or any ``nn.Module`` called as
``model(**batch)``) over tokenized batches and collects, for every module it is asked about,
``C = X^T X / n`` (d_in x d_in, float64) over the ``n`` input rows (tokens) it saw, with
padding positions left out when the batch has an ``attention_mask``. It uses plain forward
hooks and knows nothing of LoTR layers.

All target modules are collected in one pass over the data, which suits models of MiniLM's
or RoBERTa's size (12 modules of 384 or 768 inputs: 14 or 57 MiB in float64). Modules with
more than ``max_dense_dim`` inputs keep a frequent-directions sketch instead (``S`` with
``sketch_rank`` rows, ``S^T S <= X^T X`` and ``X^T X - S^T S`` at most
``||X - X_k||_F^2 / (sketch_rank - k)`` in spectral norm for every k), so a 4096-wide module
costs ``2 * sketch_rank * 4096`` floats; to hold less at once, call :func:`calibrate` once
per group with ``modules`` set to that group's modules. Modules that read the same input
tensor (query, key and value of one layer) share one product per batch.

The text inputs of the command line (:func:`read_texts`: a text file with one text per line,
or a TSV with a header whose first column is the text) are tokenized by
:func:`tokenized_batches`; :func:`load_base_model` loads a local model folder offline.
"""

from __future__ import annotations

import csv
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..adapter.layout import LoTRAdapterFiles
from ..core import Tucker2, lowrank_norm_sq, relative_error_lowrank, weighted_residuals_lowrank
from ..progress import Progress, no_progress
from ..report import Result

#: Eigenvalues of C below this share of the largest are dropped from its factor.
_CUTOFF = 1e-12
#: The file a calibrated job writes next to the adapter or zoo: its report, which ``inspect`` shows.
REPORT_NAME = "compression_report.json"
#: transformers model classes by PEFT task type, for :func:`load_base_model`.
_AUTO_CLASSES = {
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "CAUSAL_LM": "AutoModelForCausalLM",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
}


@dataclass
class ModuleStats:
    """The inputs one module saw: their count and ``X^T X`` (or a sketch of it).

    Attributes
    ----------
    d_in : int
        Input features.
    rows : int
        Input rows (tokens) seen.
    gram : torch.Tensor or None
        ``X^T X``, (d_in, d_in) float64, when ``d_in <= max_dense_dim``.
    sketch : torch.Tensor or None
        A frequent-directions sketch ``S`` (m, d_in), float64, with ``S^T S ≈ X^T X``, otherwise.
    """

    d_in: int
    rows: int = 0
    gram: torch.Tensor | None = None
    sketch: torch.Tensor | None = None

    def second_moment(self) -> torch.Tensor:
        """``C = X^T X / n`` (d_in, d_in) float64 (from the sketch when there is one)."""
        gram = self.gram if self.gram is not None else self._sketch_gram()
        return gram / max(self.rows, 1)

    def factor(self) -> torch.Tensor:
        """``Z`` (d_in, k) float64 with ``Z Z^T = C``: ``C``'s eigenvectors times the roots of its eigenvalues.

        Eigenvalues below ``1e-12`` of the largest are dropped, so ``k <= d_in``; a sketch
        gives ``S^T / sqrt(n)`` directly (k = its rows).
        """
        if self.gram is None:
            assert self.sketch is not None
            return self.sketch.T / max(self.rows, 1) ** 0.5
        values, vectors = torch.linalg.eigh(self.second_moment())
        keep = values > _CUTOFF * max(float(values.max()), 0.0)
        return vectors[:, keep] * values[keep].sqrt()

    def _sketch_gram(self) -> torch.Tensor:
        assert self.sketch is not None
        return self.sketch.T @ self.sketch


@dataclass
class CalibrationStats:
    """Input statistics of a model's modules, by module path (what :func:`calibrate` returns).

    ``samples`` is the number of sequences, ``tokens`` the rows each module saw (without padding).
    """

    modules: dict[str, ModuleStats]
    samples: int = 0
    tokens: int = 0
    seconds: float = 0.0

    def factor(self, module: str) -> torch.Tensor:
        """``Z`` (d_in, k) with ``Z Z^T = C`` of ``module``; see :meth:`ModuleStats.factor`."""
        if module not in self.modules:
            known = ", ".join(sorted(self.modules)[:4])
            raise KeyError(f"no calibration statistics for module {module!r}; collected for {known}, …")
        return self.modules[module].factor()

    def factors(self, modules: Sequence[str]) -> list[torch.Tensor]:
        """:meth:`factor` of each of ``modules``, in order."""
        return [self.factor(m) for m in modules]

    def summary(self) -> dict[str, Any]:
        """Sequences, tokens, seconds, and how many modules keep a sketch rather than ``X^T X``."""
        sketched = sum(s.gram is None for s in self.modules.values())
        return {"samples": self.samples, "tokens": self.tokens, "seconds": self.seconds, "sketched_modules": sketched}


class _Collector:
    """Forward hooks that add each target module's input rows to its statistics."""

    def __init__(self, modules: dict[str, nn.Module], max_dense_dim: int, sketch_rank: int) -> None:
        self.stats: dict[str, ModuleStats] = {}
        self.mask: torch.Tensor | None = None
        self._cache: dict[tuple[int, tuple[int, ...]], torch.Tensor] = {}
        self.sketch_rank = sketch_rank
        self.handles = []
        for name, module in modules.items():
            d_in = _in_features(module, name)
            dense = d_in <= max_dense_dim
            self.stats[name] = ModuleStats(
                d_in,
                gram=torch.zeros(d_in, d_in, dtype=torch.float64) if dense else None,
                sketch=None if dense else torch.zeros(0, d_in, dtype=torch.float64),
            )
            self.handles.append(module.register_forward_hook(self._hook(name)))

    def _hook(self, name: str):
        def hook(_module: nn.Module, args: tuple[Any, ...], _output: Any) -> None:
            if not args or not torch.is_tensor(args[0]):
                raise ValueError(f"calibration: module {name!r} was called without a tensor input")
            self.add(name, args[0])

        return hook

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """The input rows (n, d_in), without padding positions when the batch's mask fits."""
        x = x.detach()
        if self.mask is not None and tuple(x.shape[:-1]) == tuple(self.mask.shape):
            x = x[self.mask.to(device=x.device, dtype=torch.bool)]
        return x.reshape(-1, x.shape[-1])

    def add(self, name: str, x: torch.Tensor) -> None:
        stats = self.stats[name]
        if x.shape[-1] != stats.d_in:
            raise ValueError(f"calibration: module {name!r} got inputs of width {x.shape[-1]}, expected {stats.d_in}")
        rows = self.rows(x)
        if stats.gram is not None:
            key = (x.data_ptr(), tuple(x.shape))
            if key not in self._cache:  # query, key and value of a layer read one tensor: one product
                low = rows.float() if rows.dtype != torch.float64 else rows
                self._cache[key] = (low.T @ low).to(device="cpu", dtype=torch.float64)
            stats.gram += self._cache[key]
        else:
            stats.sketch = _frequent_directions(
                stats.sketch, rows.to(device="cpu", dtype=torch.float64), self.sketch_rank
            )
        stats.rows += int(rows.shape[0])

    def next_batch(self, mask: torch.Tensor | None) -> None:
        self.mask = mask
        self._cache.clear()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self._cache.clear()


def _frequent_directions(sketch: torch.Tensor, rows: torch.Tensor, rank: int) -> torch.Tensor:
    """Add ``rows`` to a frequent-directions sketch of at most ``2 * rank`` rows.

    When the buffer is full its SVD ``U diag(s) V^T`` is shrunk to ``rank`` rows
    ``diag(sqrt(s_i^2 - s_rank^2)) V^T``: ``S^T S`` never exceeds ``X^T X`` and misses at most
    the sum of the shrinkages (Liberty's bound).
    """
    for start in range(0, rows.shape[0], rank):
        sketch = torch.cat([sketch, rows[start : start + rank]])
        if sketch.shape[0] >= 2 * rank:
            _, values, vh = torch.linalg.svd(sketch, full_matrices=False)
            shrunk = (values[:rank] ** 2 - values[rank] ** 2).clamp_min(0).sqrt()
            sketch = shrunk[:, None] * vh[:rank]
    return sketch


def _in_features(module: nn.Module, name: str) -> int:
    """``d_in`` of a Linear or GPT-2 Conv1D (weight (d_in, d_out)) module."""
    if isinstance(module, nn.Linear):
        return int(module.in_features)
    weight = getattr(module, "weight", None)
    if type(module).__name__ == "Conv1D" and weight is not None:
        return int(weight.shape[0])
    raise ValueError(f"calibration: module {name!r} is a {type(module).__name__}, not a Linear or Conv1D layer")


def resolve_modules(model: nn.Module, names: Iterable[str]) -> dict[str, nn.Module]:
    """``names`` (module paths, as a LoRA names them) -> the model's modules.

    A path the model lacks is matched by its tail: ``bert.encoder.layer.0.attention.self.query``
    finds ``encoder.layer.0.attention.self.query`` in a bare ``BertModel``, and the reverse.
    Raises ``ValueError`` naming the paths that match no module, or more than one.
    """
    available = dict(model.named_modules())
    found: dict[str, nn.Module] = {}
    missing = []
    for name in names:
        if name in available:
            found[name] = available[name]
            continue
        candidates = [m for m in available if m and (m.endswith("." + name) or name.endswith("." + m))]
        if len(candidates) == 1:
            found[name] = available[candidates[0]]
        else:
            missing.append(name)
    if missing:
        some = ", ".join(n for n, m in list(available.items())[1:4])
        raise ValueError(
            f"calibration: the base model ({type(model).__name__}) has no module {missing[0]!r}"
            f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}; its modules are named like {some}, …"
        )
    return found


@torch.no_grad()
def calibrate(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    modules: Iterable[str],
    *,
    samples: int | None = None,
    max_dense_dim: int = 4096,
    sketch_rank: int = 256,
    progress: Progress | None = None,
) -> CalibrationStats:
    """Run ``model`` over ``batches`` and collect each module's input second moment.

    Parameters
    ----------
    model : nn.Module
        The base model, without adapters (a transformers model; any module called as
        ``model(**batch)``). It is put in eval mode.
    batches : iterable of dict
        Tokenized batches (``input_ids`` (B, T), ``attention_mask`` (B, T), …), as a
        tokenizer returns them; tensors are moved to the model's device.
    modules : iterable of str
        Module paths, e.g. a LoRA's modules (see :func:`resolve_modules`).
    samples : int, optional
        Stop after this many sequences (the batch that crosses the limit is cut).
    max_dense_dim : int
        Above this ``d_in`` a module keeps a sketch of ``sketch_rank`` rows instead of ``X^T X``.
    sketch_rank : int

    Returns
    -------
    CalibrationStats
        Per module ``X^T X`` (or its sketch) and the rows seen.

    Raises
    ------
    ValueError
        For a module the model lacks, no batches, or a batch without ``input_ids``.
    """
    start = time.perf_counter()
    names = list(modules)
    targets = resolve_modules(model, names)
    collector = _Collector(targets, max_dense_dim, sketch_rank)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    model.eval()
    seen = 0
    try:
        for batch in (progress or no_progress)(batches, "calibrating", None):
            if samples is not None and seen >= samples:
                break
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            size = _batch_size(batch)
            if samples is not None and seen + size > samples:
                batch = {k: v[: samples - seen] if torch.is_tensor(v) else v for k, v in batch.items()}
                size = samples - seen
            collector.next_batch(batch.get("attention_mask"))
            model(**batch)
            seen += size
    finally:
        collector.remove()
    if seen == 0:
        raise ValueError("calibration: no batches of inputs were given")
    stats = CalibrationStats(
        {name: collector.stats[name] for name in names},
        samples=seen,
        tokens=max(s.rows for s in collector.stats.values()),
        seconds=time.perf_counter() - start,
    )
    unseen = [n for n, s in stats.modules.items() if s.rows == 0]
    if unseen:
        raise ValueError(f"calibration: modules {unseen[:3]} never ran on the inputs; are they used by forward()?")
    return stats


def _batch_size(batch: Mapping[str, Any]) -> int:
    ids = batch.get("input_ids")
    if ids is None:
        ids = next((v for v in batch.values() if torch.is_tensor(v)), None)
    if ids is None:
        raise ValueError(f"calibration: a batch holds no tensors (keys {sorted(batch)})")
    return int(ids.shape[0])


def read_texts(path: str | os.PathLike, limit: int | None = None) -> list[str]:
    """Calibration texts from ``path``: a TSV (``.tsv``, a header row, the text in the first column) or one per line.

    Empty lines are skipped. Raises ``FileNotFoundError`` for a missing file and ``ValueError``
    for a file without texts or one that is not UTF-8.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such calibration file")
    texts: list[str] = []
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            if path.suffix.lower() == ".tsv":
                reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
                next(reader, None)  # the header
                lines: Iterable[str] = (row[0] if row else "" for row in reader)
            else:
                lines = (line.rstrip("\r\n") for line in handle)
            for line in lines:
                if line.strip():
                    texts.append(line)
                if limit is not None and len(texts) >= limit:
                    break
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if not texts:
        raise ValueError(f"{path}: no calibration texts")
    return texts


def tokenized_batches(
    tokenizer: Any, texts: Sequence[str], batch_size: int = 16, max_length: int = 128
) -> list[dict[str, torch.Tensor]]:
    """``texts`` tokenized in batches (padded, truncated to ``max_length`` tokens), as PyTorch tensors."""
    if getattr(tokenizer, "pad_token", True) is None:  # GPT-2 style tokenizers have no pad token
        tokenizer.pad_token = tokenizer.eos_token
    return [
        dict(tokenizer(list(texts[i : i + batch_size]), padding=True, truncation=True, max_length=max_length,
                       return_tensors="pt"))
        for i in range(0, len(texts), batch_size)
    ]  # fmt: skip


def load_base_model(
    path: str | os.PathLike, task_type: str | None = None, num_labels: int | None = None
) -> tuple[Any, nn.Module]:
    """Tokenizer and model from a local transformers folder, offline.

    ``task_type`` (PEFT's, e.g. ``"SEQ_CLS"``) picks the model class, so module paths match
    the LoRA's; ``num_labels`` sizes a new classification head. Raises ``FileNotFoundError``
    when ``path`` is not a folder with ``config.json``.
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
    hf_logging.set_verbosity_error()  # a new task head is expected to be untrained
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
        model = auto.from_pretrained(str(folder), **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
    return tokenizer, model.eval()


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
        if self.inputs is not None:
            self.inputs = _first_samples(list(self.inputs), self.samples)

    def statistics(self, modules: Sequence[str], progress: Progress | None = None) -> CalibrationStats:
        """The given ``stats`` (checked to cover ``modules``), or :func:`calibrate` on the inputs."""
        if self.stats is None:
            assert self.inputs is not None and self.base_model is not None
            self.stats = calibrate(self.base_model, self.inputs, modules, progress=progress)
        missing = [m for m in modules if m not in self.stats.modules]
        if missing:
            raise ValueError(f"the calibration statistics lack modules {missing[:3]} of the adapter")
        return self.stats


def _first_samples(batches: list[Mapping[str, Any]], samples: int | None) -> list[Mapping[str, Any]]:
    """The batches up to ``samples`` sequences (the last one cut)."""
    if samples is None:
        return batches
    out, seen = [], 0
    for batch in batches:
        if seen >= samples:
            break
        size = _batch_size(batch)
        if seen + size > samples:
            batch = {k: v[: samples - seen] if torch.is_tensor(v) else v for k, v in batch.items()}
            size = samples - seen
        out.append(batch)
        seen += size
    return out


def as_calibration(value: Calibration | CalibrationStats | None) -> Calibration | None:
    """``calibration=`` of the jobs as a :class:`Calibration` (statistics alone are wrapped)."""
    if value is None or isinstance(value, Calibration):
        return value
    if isinstance(value, CalibrationStats):
        return Calibration(stats=value)
    raise TypeError(f"calibration must be a Calibration or CalibrationStats, got {type(value).__name__}")


@dataclass
class ErrorSums:
    """Squared errors and norms of some layers, to add up per group, adapter or in total.

    ``weight`` / ``weight_ref``: ``sum ||dW_l - U G_l V^T||^2`` and ``sum ||dW_l||^2``;
    ``output`` / ``output_ref``: the same weighted by the calibration, ``||(…) Z_l||^2``
    (None without calibration).
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


def group_tucker(files: LoTRAdapterFiles, group: str, modules: Sequence[str] | None = None) -> Tucker2:
    """Group ``group`` of an adapter as a Tucker2 (the scale in the cores), for ``modules`` (default: all)."""
    return files.tucker(group, modules)


def compression_document(report: Result) -> dict[str, Any]:
    """The JSON document of a calibrated job's report, written as :data:`REPORT_NAME` beside its output."""
    return {"format": "tensorlotr-compression-report", "format_version": 1, **report.to_dict()}


#: The error columns of a compression report that ``inspect`` shows, in order.
ERROR_KEYS = ("relative_error", "output_error", "healed_error", "healed_output_error")


def add_report_columns(rows: list[dict[str, Any]], folder: str | os.PathLike, section: str, key: str) -> None:
    """Add the error columns of ``folder``'s :data:`REPORT_NAME`, when it has one, to ``rows`` (in place).

    ``section`` is the report's list (``"groups"`` or ``"adapters"``) and ``key`` the field
    that names a row in it and in ``rows``. A folder without the file (an adapter compressed
    without calibration, or by an older tensorlotr) is left as it is.
    """
    from ..files.jsonfile import read_json_object

    path = Path(folder) / REPORT_NAME
    if not path.is_file():
        return
    entries = read_json_object(path).get(section)
    by_name = {e.get(key): e for e in entries if isinstance(e, dict)} if isinstance(entries, list) else {}
    for row in rows:
        entry = by_name.get(row.get(key), {})
        for column in ERROR_KEYS:
            value = entry.get(column)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                row[column] = float(value)


def _head_of(folder: Path) -> tuple[str | None, int | None]:
    """PEFT's task type of the adapter in ``folder`` and, for a classification head it saves, its number of labels."""
    from ..io import is_lotr_dir, read_adapter
    from ..io.peft_lora import CONFIG_NAME, PeftLoRA

    if (folder / CONFIG_NAME).is_file():
        lora = PeftLoRA(folder)
        task, saved = lora.config.get("task_type"), lora.load_modules_to_save()
    elif is_lotr_dir(folder):
        files = read_adapter(folder)
        task, saved = files.config.get("task_type") or files.base_model.get("task_type"), files.modules_to_save
    else:
        return None, None
    heads = [t for k, t in saved.items() if k.endswith(".weight") and t.ndim == 2 and k.split(".")[-2] in _HEADS]
    return task, int(heads[0].shape[0]) if heads else None


#: Names of classification output layers whose rows are the labels.
_HEADS = ("classifier", "score", "out_proj")


def calibration_from_files(
    base_model: str | os.PathLike,
    data: str | os.PathLike,
    adapter: str | os.PathLike,
    *,
    samples: int = 256,
    batch_size: int = 16,
    max_length: int = 128,
    heal_steps: int = 0,
    heal_lr: float = 1e-3,
    heal_factors: bool = False,
    objective: str = "output",
) -> Calibration:
    """What the command line's ``--base-model DIR --calibration-data FILE`` mean.

    The base model is loaded from the local folder ``base_model`` with the class that the
    adapter in ``adapter`` (a PEFT LoRA or LoTR folder) was trained on (its ``task_type``)
    and, for a saved classification head, its number of labels; the first ``samples`` texts
    of ``data`` (:func:`read_texts`) are tokenized in batches of ``batch_size``.
    """
    task, num_labels = _head_of(Path(adapter))
    tokenizer, model = load_base_model(base_model, task, num_labels)
    texts = read_texts(data, limit=samples)
    return Calibration(
        inputs=tokenized_batches(tokenizer, texts, batch_size, max_length), base_model=model,
        heal_steps=heal_steps, heal_lr=heal_lr, heal_factors=heal_factors, objective=objective,
    )  # fmt: skip
