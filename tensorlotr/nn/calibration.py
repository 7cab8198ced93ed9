"""Calibration statistics: forward hooks that collect the second moment of each target module's inputs.

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

The settings that the jobs take (:class:`tensorlotr.jobs.calibration.Calibration`) and the
tokenizing of texts live in :mod:`tensorlotr.jobs.calibration`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..progress import Progress, no_progress

__all__ = ["CalibrationStats", "ModuleStats", "calibrate", "first_samples", "resolve_modules"]

#: Eigenvalues of C below this share of the largest are dropped from its factor.
_CUTOFF = 1e-12


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

    Examples
    --------
    100 input rows of 4 features, ``X`` (100, 4):

    >>> import torch
    >>> x = torch.randn(100, 4, dtype=torch.float64)
    >>> stats = ModuleStats(4, rows=100, gram=x.T @ x)
    >>> torch.allclose(stats.second_moment(), x.T @ x / 100)
    True
    >>> z = stats.factor()  # Z (4, k) with Z Z^T = C
    >>> torch.allclose(z @ z.T, stats.second_moment())
    True
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
            scaled: torch.Tensor = self.sketch.T / max(self.rows, 1) ** 0.5
            return scaled
        values, vectors = torch.linalg.eigh(self.second_moment())
        keep = values > _CUTOFF * max(float(values.max()), 0.0)
        factor: torch.Tensor = vectors[:, keep] * values[keep].sqrt()
        return factor

    def _sketch_gram(self) -> torch.Tensor:
        assert self.sketch is not None
        return self.sketch.T @ self.sketch


@dataclass
class CalibrationStats:
    """Input statistics of a model's modules, by module path (what :func:`calibrate` returns).

    ``samples`` is the number of sequences, ``tokens`` the rows each module saw (without padding).

    Examples
    --------
    >>> import torch
    >>> x = torch.randn(50, 3, dtype=torch.float64)  # the inputs X (50, 3) of module "proj"
    >>> stats = CalibrationStats({"proj": ModuleStats(3, rows=50, gram=x.T @ x)}, samples=5, tokens=50)
    >>> [tuple(z.shape) for z in stats.factors(["proj"])]
    [(3, 3)]
    >>> stats.summary()["sketched_modules"]
    0
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
        self.handles: list[torch.utils.hooks.RemovableHandle] = []
        for name, module in modules.items():
            d_in = _in_features(module, name)
            dense = d_in <= max_dense_dim
            self.stats[name] = ModuleStats(
                d_in,
                gram=torch.zeros(d_in, d_in, dtype=torch.float64) if dense else None,
                sketch=None if dense else torch.zeros(0, d_in, dtype=torch.float64),
            )
            self.handles.append(module.register_forward_hook(self._hook(name)))

    def _hook(self, name: str) -> Callable[[nn.Module, tuple[Any, ...], Any], None]:
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
            assert stats.sketch is not None
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

    Examples
    --------
    >>> from torch import nn
    >>> model = nn.ModuleDict({"proj": nn.Linear(8, 4)})
    >>> resolve_modules(model, ["bert.proj"])
    {'bert.proj': Linear(in_features=8, out_features=4, bias=True)}
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

    Examples
    --------
    A model with one Linear module ``proj`` (8 -> 4), called with ``input_ids`` (B, T, 8);
    the second sequence has two padding positions, which are left out:

    >>> import torch
    >>> from torch import nn
    >>> class Tiny(nn.Module):
    ...     def __init__(self) -> None:
    ...         super().__init__()
    ...         self.proj = nn.Linear(8, 4)
    ...
    ...     def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    ...         return self.proj(input_ids)
    >>> batch = {"input_ids": torch.randn(2, 5, 8), "attention_mask": torch.tensor([[1] * 5, [1, 1, 1, 0, 0]])}
    >>> stats = calibrate(Tiny(), [batch], ["proj"])
    >>> stats.samples, stats.tokens, tuple(stats.modules["proj"].second_moment().shape)
    (2, 8, (8, 8))
    """
    start = time.perf_counter()
    names = list(modules)
    targets = resolve_modules(model, names)
    collector = _Collector(targets, max_dense_dim, sketch_rank)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    model.eval()
    seen = 0
    try:
        for batch in (progress or no_progress)(first_samples(batches, samples), "calibrating", None):
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            collector.next_batch(batch.get("attention_mask"))
            model(**batch)
            seen += _batch_size(batch)
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


def first_samples(batches: Iterable[Mapping[str, Any]], samples: int | None) -> Iterator[Mapping[str, Any]]:
    """The batches up to ``samples`` sequences, the one that crosses the limit cut (all batches for None).

    Examples
    --------
    >>> import torch
    >>> batches = [{"input_ids": torch.zeros(4, 3, dtype=torch.long)} for _ in range(3)]
    >>> [tuple(b["input_ids"].shape) for b in first_samples(batches, 6)]
    [(4, 3), (2, 3)]
    """
    if samples is None:
        yield from batches
        return
    seen = 0
    for batch in batches:
        if seen >= samples:
            return
        size = _batch_size(batch)
        if seen + size > samples:
            batch = {k: v[: samples - seen] if torch.is_tensor(v) else v for k, v in batch.items()}
            size = samples - seen
        yield batch
        seen += size


def _batch_size(batch: Mapping[str, Any]) -> int:
    """The number of sequences in ``batch``: the rows of its ``input_ids`` (or of its first tensor)."""
    ids = batch.get("input_ids")
    if ids is None:
        ids = next((v for v in batch.values() if torch.is_tensor(v)), None)
    if ids is None:
        raise ValueError(f"calibration: a batch holds no tensors (keys {sorted(batch)})")
    return int(ids.shape[0])
