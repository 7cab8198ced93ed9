"""Decompose fine-tuned deltas (fine-tuned minus base) into a LoTR adapter, streaming.

For each group (one projection type across layers, dW_l = W_ft,l - W_base,l of shape
(d_out, d_in)) the deltas are read one layer at a time and never stacked:

- **Exact route** (``max(d_out, d_in) <= gram_max_dim``, default 1024): pass 1 accumulates
  the Gram matrices ``sum_l dW_l dW_l^T`` and ``sum_l dW_l^T dW_l`` in float64; their
  eigenvectors are the HOSVD factors. Pass 2 forms the cores ``G_l = U^T dW_l V``. Each
  HOOI sweep adds two passes. Memory: two d x d Grams plus one layer.
- **Randomized route** (larger d): pass 1 sketches both unfoldings with Gaussian test
  matrices, ``Y_out = sum_l dW_l Omega_l`` and ``Y_in = sum_l dW_l^T Psi_l`` (k = rank +
  oversample columns); each of ``n_power`` power iterations adds a pass
  (``Y_out = sum_l dW_l dW_l^T Q_out``). Pass 2 projects every layer onto the two sketch
  bases, ``S_l = Q_out^T dW_l Q_in`` (k x k), and the small stack is decomposed in memory
  with :func:`tensorlotr.tucker2` (HOOI sweeps included). Memory: O(d k) plus one layer.

Errors are exact for what was computed: ``||dW - U G V^T||^2 = ||dW||^2 - ||G||^2`` with
orthonormal factors and ``G = U^T dW V``, summed in float64.
"""

from __future__ import annotations

import difflib
import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ._adapter import adapter_config, store_group
from .core import tucker2_streaming
from .core.backend import normalize_rank
from .io.atomic import atomic_dir, check_output
from .io.checkpoint import WeightSource, open_weights
from .io.lotr_format import write_adapter
from .io.peft_lora import module_order
from .layout import GroupLayout, LoTRAdapterFiles
from .nn.targets import group_modules, matches
from .progress import Progress, no_progress


@dataclass
class GroupDecomposition:
    """One group's result: ranks, parameters, and what the ranks cost."""

    group: str
    layers: int
    shape: tuple[int, int]
    rank: tuple[int, int]
    lotr_params: int
    relative_error: float
    energy_kept: float
    route: str
    passes: int
    seconds: float


@dataclass
class DecompositionReport:
    """What :func:`decompose` found and wrote."""

    base: str
    finetuned: str
    output: str | None
    groups: list[GroupDecomposition]
    changed_modules: list[dict[str, Any]] = field(default_factory=list)
    saved_modules: list[str] = field(default_factory=list)
    relative_error: float = 0.0
    seconds: float = 0.0

    @property
    def lotr_params(self) -> int:
        return sum(g.lotr_params for g in self.groups)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["totals"] = {"lotr_params": self.lotr_params, "relative_error": self.relative_error}
        return data

    def table(self) -> str:
        from .report import format_table

        rows = [
            {
                "group": g.group,
                "layers": g.layers,
                "shape": g.shape,
                "rank": g.rank,
                "params": g.lotr_params,
                "rel. error": g.relative_error,
                "energy kept": g.energy_kept,
                "route": g.route,
            }
            for g in self.groups
        ]
        lines = [format_table(rows)]
        if self.changed_modules:
            kept = "kept in the adapter" if self.saved_modules else "not kept; --save-changed-modules keeps them"
            names = ", ".join(c["key"] for c in self.changed_modules[:8])
            more = f" and {len(self.changed_modules) - 8} more" if len(self.changed_modules) > 8 else ""
            lines.append(f"other changed tensors ({kept}): {names}{more}")
        summary = f"{self.lotr_params:,} LoTR params, relative error {self.relative_error:.3e}, {self.seconds:.1f} s"
        if self.output:
            summary += f"; wrote {self.output}"
        return "\n".join([*lines, summary])


@dataclass
class Decomposition:
    """The adapter (in memory) and its report. ``to_model(base)`` attaches it to a model."""

    adapter: LoTRAdapterFiles
    report: DecompositionReport

    def to_model(self, model: nn.Module, is_trainable: bool = False) -> Any:
        from .nn.model import LoTRModel

        return LoTRModel.from_adapter_files(model, self.adapter, is_trainable=is_trainable)


class _Deltas:
    """``dW_l`` of one group, read one layer at a time in the compute dtype.

    Each yielded delta lives in a buffer that the next layer overwrites.
    """

    def __init__(
        self, base: WeightSource, finetuned: WeightSource, modules: list[str], transposed: bool, dtype: torch.dtype
    ) -> None:
        self.base, self.finetuned, self.modules = base, finetuned, modules
        self.transposed, self.dtype = transposed, dtype
        self.passes = 0
        self._buffer: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.modules)

    def layers(self, progress: Progress, desc: str) -> Iterable[tuple[int, torch.Tensor]]:
        self.passes += 1
        for i in progress(range(len(self.modules)), desc, len(self.modules)):
            key = self.modules[i] + ".weight"
            finetuned = self.finetuned.get(key)
            if self._buffer is None or self._buffer.shape != finetuned.shape:
                self._buffer = torch.empty(finetuned.shape, dtype=self.dtype)
            # one reused buffer: no 64 MiB allocation (and its page faults) per layer and pass
            delta = self._buffer.copy_(finetuned)
            del finetuned
            delta.sub_(self.base.get(key))  # computed in the compute dtype, whatever the base's
            yield i, (delta.T if self.transposed else delta)

    def layer_blocks(
        self, progress: Progress, desc: str, block_bytes: int = 1 << 21
    ) -> Iterable[tuple[int, Callable[[], Iterable[tuple[int, torch.Tensor]]]]]:
        """Per layer, a function giving its delta as ``(first row, rows x d_in block)`` pieces.

        Each block (about ``block_bytes``) is formed from the stored weights straight into a
        small cache-sized buffer, so a pass that only needs products with thin matrices never
        writes the full float32 layer; a pass may sweep a layer's blocks more than once.
        (Transposed, Conv1D-style layers come as one block.)
        """
        if self.transposed:
            for i, delta in self.layers(progress, desc):
                yield i, (lambda delta=delta: [(0, delta)])
            return
        self.passes += 1
        for i in progress(range(len(self.modules)), desc, len(self.modules)):
            key = self.modules[i] + ".weight"
            finetuned, base = self.finetuned.get(key), self.base.get(key)
            yield i, (lambda f=finetuned, b=base: self._blocks(f, b, block_bytes))

    def _blocks(
        self, finetuned: torch.Tensor, base: torch.Tensor, block_bytes: int
    ) -> Iterable[tuple[int, torch.Tensor]]:
        rows, cols = finetuned.shape
        step = max(1, block_bytes // (cols * torch.finfo(self.dtype).bits // 8))
        buffer = torch.empty(min(step, rows), cols, dtype=self.dtype)
        for start in range(0, rows, step):
            block = buffer[: min(step, rows - start)]
            block.copy_(finetuned[start : start + step])
            block.sub_(base[start : start + step])
            yield start, block

    def check_finite(self, i: int, norm_sq: float) -> float:
        """Raise if layer ``i``'s squared norm (from the first pass) shows NaN or Inf values."""
        if not math.isfinite(norm_sq):
            raise ValueError(f"{self.modules[i]}.weight: the fine-tuned or base weights hold NaN or Inf values")
        return norm_sq


def _check_architectures(base: WeightSource, finetuned: WeightSource) -> list[str]:
    """Keys only the fine-tuned model has (a new head, say); errors on missing keys or other shapes."""
    missing = sorted(set(base.shapes) - set(finetuned.shapes))
    if missing:
        raise ValueError(f"{finetuned.name} lacks tensors the base has, e.g. {missing[:5]}; are these the same model?")
    for key, shape in base.shapes.items():
        if finetuned.shapes[key] != shape:
            raise ValueError(f"{key}: base has shape {shape}, fine-tuned has {finetuned.shapes[key]}")
    return sorted(set(finetuned.shapes) - set(base.shapes))


def _targets(base: WeightSource, patterns: str | list[str], transposed: set[str]) -> dict[str, tuple[int, int]]:
    candidates = {k[: -len(".weight")]: s for k, s in base.shapes.items() if k.endswith(".weight") and len(s) == 2}
    found = {
        m: (s[1], s[0]) if m in transposed else (s[0], s[1]) for m, s in candidates.items() if matches(m, patterns)
    }
    if not found:
        names = sorted({m.rsplit(".", 1)[-1] for m in candidates})
        wanted = [patterns] if isinstance(patterns, str) else list(patterns)
        close = sorted({c for p in wanted for c in difflib.get_close_matches(p.rsplit(".", 1)[-1], names, n=5)})
        hint = f"; close names: {close}" if close else ""
        raise ValueError(f"target_modules {patterns!r} match no 2-d weight of {base.name}{hint}; names: {names[:30]}")
    return dict(sorted(found.items(), key=lambda item: module_order(item[0])))


def decompose(
    base: str | os.PathLike | nn.Module | dict[str, torch.Tensor],
    finetuned: str | os.PathLike | nn.Module | dict[str, torch.Tensor],
    out_dir: str | os.PathLike | None = None,
    *,
    target_modules: str | list[str],
    rank: int | tuple[int, int] | None = None,
    energy: float | None = None,
    groups: str | dict[str, list[str]] | None = None,
    n_iter: int = 0,
    dtype: torch.dtype = torch.float32,
    save_changed_modules: bool = False,
    force: bool = False,
    gram_max_dim: int = 1024,
    oversample: int = 16,
    n_power: int = 1,
    max_rank: int = 256,
    seed: int = 0,
    progress: Progress | None = None,
) -> Decomposition:
    """LoTR adapter of the deltas ``finetuned - base`` in the modules ``target_modules``.

    Parameters
    ----------
    base, finetuned : path, nn.Module or state dict
        Hugging Face model folders (safetensors, sharded with an index, or
        ``pytorch_model.bin`` read weights-only), modules, or state dicts, with the same keys.
    out_dir : path, optional
        Write the adapter there (``lotr_config.json`` + ``lotr_model.safetensors``),
        atomically; an existing folder needs ``force``.
    target_modules : list of str or str
        Module name suffixes or a regex, as in :class:`tensorlotr.LoTRConfig`.
    rank, energy, groups, n_iter
        As in :func:`tensorlotr.convert.convert_lora`. ``rank=None`` without ``energy``
        keeps the full rank (exact).
    dtype : torch.dtype
        Compute dtype of the deltas; bf16 and fp16 weights are upcast to it.
    save_changed_modules : bool
        Keep other tensors that differ (a classifier head, norms) as ``modules_to_save``.
    gram_max_dim, oversample, n_power, max_rank, seed
        Route and sketch settings (module docstring); ``max_rank`` caps the sketch when
        only ``energy`` is given on the randomized route.

    Returns
    -------
    Decomposition
        ``adapter`` (in memory; ``to_model(base_model)`` attaches it) and ``report``:
        per group layers, shape, ranks, parameters, relative error and energy kept.
    """
    start = time.perf_counter()
    check_output(out_dir, force)
    progress = progress or no_progress
    pair = normalize_rank(rank)
    base_w, ft_w = open_weights(base, "base"), open_weights(finetuned, "fine-tuned")
    new_keys = _check_architectures(base_w, ft_w)
    transposed = base_w.conv1d_modules | ft_w.conv1d_modules
    shapes = _targets(base_w, target_modules, transposed)
    plan = group_modules(shapes, groups or "by_name")

    layouts: dict[str, GroupLayout] = {}
    tensors: dict[str, torch.Tensor] = {}
    reports: list[GroupDecomposition] = []
    err_sq = total_sq = 0.0
    for group in plan:
        group_start = time.perf_counter()
        modules = list(group.modules)
        deltas = _Deltas(base_w, ft_w, modules, modules[0] in transposed, dtype)
        tucker, norm_sq, route = tucker2_streaming(
            deltas, group.shape, pair, energy=energy, n_iter=n_iter, gram_max_dim=gram_max_dim,
            oversample=oversample, n_power=n_power, max_rank=max_rank, seed=seed, progress=progress, name=group.name,
        )  # fmt: skip
        kept_sq = float(torch.as_tensor(tucker.core).to(torch.float64).square().sum())
        group_err_sq = max(norm_sq - kept_sq, 0.0)
        err_sq += group_err_sq
        total_sq += norm_sq
        store_group(tensors, layouts, group.name, modules, tucker, fan_in_fan_out=deltas.transposed)
        reports.append(
            GroupDecomposition(
                group=group.name,
                layers=len(modules),
                shape=group.shape,
                rank=tucker.rank,
                lotr_params=tucker.n_params,
                relative_error=math.sqrt(group_err_sq / norm_sq) if norm_sq > 0 else 0.0,
                energy_kept=kept_sq / norm_sq if norm_sq > 0 else 1.0,
                route=route,
                passes=deltas.passes,
                seconds=time.perf_counter() - group_start,
            )
        )
    if total_sq == 0.0:
        raise ValueError(
            f"{ft_w.name} equals {base_w.name} in every targeted module: all deltas are zero, nothing to decompose"
        )

    target_keys = {m + ".weight" for m in shapes}
    changed = []
    for key in progress([k for k in base_w.shapes if k not in target_keys], "other tensors", len(base_w.shapes)):
        before, after = base_w.get(key), ft_w.get(key)
        if not torch.equal(before, after):
            diff = (after.to(torch.float64) - before.to(torch.float64)).norm()
            rel = float(diff / before.to(torch.float64).norm()) if before.numel() and before.any() else float("inf")
            changed.append({"key": key, "shape": list(before.shape), "relative_change": rel})
    changed += [{"key": key, "shape": list(ft_w.shapes[key]), "relative_change": None} for key in new_keys]
    saved: list[str] = []
    if save_changed_modules:
        for item in changed:
            tensors[f"modules_to_save.{item['key']}"] = ft_w.get(item["key"]).clone()
        saved = sorted({item["key"].rsplit(".", 1)[0] for item in changed})

    config = adapter_config(layouts, target_modules, groups or "by_name", saved)
    base_info = {
        "name_or_path": str(base) if isinstance(base, (str, os.PathLike)) else None,
        "model_type": base_w.config.get("model_type"),
        "class": (base_w.config.get("architectures") or [None])[0] if base_w.config else None,
    }
    if isinstance(base, nn.Module):
        base_info["class"] = type(base).__name__
    adapter = LoTRAdapterFiles(config.to_dict(), layouts, tensors, base_info)
    report = DecompositionReport(
        base=base_w.name,
        finetuned=ft_w.name,
        output=str(out_dir) if out_dir is not None else None,
        groups=reports,
        changed_modules=changed,
        saved_modules=saved,
        relative_error=math.sqrt(err_sq / total_sq),
    )
    if out_dir is not None:
        with atomic_dir(out_dir, force=force) as tmp:
            write_adapter(tmp, adapter)
    report.seconds = time.perf_counter() - start
    return Decomposition(adapter, report)
