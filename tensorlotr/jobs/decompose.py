"""Decompose fine-tuned deltas (fine-tuned minus base) into a LoTR adapter, streaming.

For each group (one projection type across layers, ``dW_l = W_ft,l - W_base,l`` of shape
(d_out, d_in)) the deltas are read one layer at a time, in passes, and never stacked: this
module reads the two checkpoints (:class:`_Deltas`), and
:func:`tensorlotr.core.tucker2_streaming` decomposes the stream (an exact Gram route for
``d <= gram_max_dim``, a randomized sketch route above it). The shared driver stores the
groups, writes the adapter and reports.

Errors are exact for what was computed: ``||dW - U G V^T||^2 = ||dW||^2 - ||G||^2`` with
orthonormal factors and ``G = U^T dW V``, summed in float64.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypedDict

import torch
from torch import nn

from ..adapter import Group, LoTRAdapterFiles, group_modules, matches, module_order
from ..adapter.groups import no_match_message, oriented_shape
from ..core import Tucker2, check_energy, normalize_rank, tucker2_streaming, tucker2_weighted
from ..files.atomic import check_output
from ..io.checkpoint import WeightSource, open_weights
from ..progress import Progress, no_progress
from ..report import Result
from .calibration import Calibration, as_calibration, error_sums
from .driver import AdapterReport, GroupOutcome, run_plan, save_adapter

if TYPE_CHECKING:
    from ..nn.calibration import CalibrationStats
    from ..nn.model import LoTRModel


class ChangedTensor(TypedDict):
    """A tensor outside the targets that the fine-tune changed (or added: ``relative_change`` None).

    ``relative_change`` is ``||after - before|| / ||before||`` (inf for a zero ``before``).

    Examples
    --------
    >>> ChangedTensor(key="pooler.dense.bias", shape=[32], relative_change=0.25)
    {'key': 'pooler.dense.bias', 'shape': [32], 'relative_change': 0.25}
    """

    key: str
    shape: list[int]
    relative_change: float | None


@dataclass(kw_only=True)
class DecompositionReport(AdapterReport):
    """What :func:`decompose` found and wrote: per group ranks, error, energy kept, route and passes.

    ``changed_modules`` lists the other tensors that differ (a head, norms), kept as
    ``modules_to_save`` with ``save_changed_modules``. Each group row gives its ``shape``
    (d_out, d_in) and ``rank`` (r_out, r_in).

    Examples
    --------
    A 2-layer BERT of hidden size 32 whose fine-tune changed each query projection by a
    rank-2 (32, 32) update and the pooler's bias:

    >>> import copy
    >>> import torch
    >>> from transformers import BertConfig, BertModel
    >>> bert = BertConfig(
    ...     vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48
    ... )
    >>> base = BertModel(bert)
    >>> finetuned = copy.deepcopy(base)
    >>> with torch.no_grad():
    ...     for layer in finetuned.encoder.layer:
    ...         layer.attention.self.query.weight += 0.01 * torch.randn(32, 2) @ torch.randn(2, 32)
    ...     finetuned.pooler.dense.bias += 0.1
    >>> report = decompose(base, finetuned, target_modules=["query"], rank=4).report
    >>> print(report)
    group  layers  shape  LoTR rank  LoTR params  rel. error  energy kept  route
    -----  ------  -----  ---------  -----------  ----------  -----------  ------------
    query       2  32x32  4x4                288   ...        1.0000       exact (Gram)
    total       2                            288   ...
    other changed tensors (not kept; --save-changed-modules keeps them): pooler.dense.bias
    288 LoTR params, relative error ..., ... s
    >>> report.changed_modules[0]["key"], report.changed_modules[0]["shape"]
    ('pooler.dense.bias', [32])
    """

    base: str
    finetuned: str
    changed_modules: list[ChangedTensor] = field(default_factory=list)
    export_lora: Result | None = None  # set by the CLI's --export-lora

    @property
    def saved_modules(self) -> list[str]:
        return self.modules_to_save

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        data["export_lora"] = self.export_lora.to_dict() if self.export_lora is not None else None
        return data

    def text(self) -> str:
        lines = [self.table()]
        if self.changed_modules:
            kept = "kept in the adapter" if self.modules_to_save else "not kept; --save-changed-modules keeps them"
            names = ", ".join(c["key"] for c in self.changed_modules[:8])
            more = f" and {len(self.changed_modules) - 8} more" if len(self.changed_modules) > 8 else ""
            lines.append(f"other changed tensors ({kept}): {names}{more}")
        lines += [*self.notes, self.summary()]
        if self.export_lora is not None:
            lines.append(self.export_lora.text())
        return "\n".join(lines)


@dataclass
class Decomposition:
    """The adapter (in memory) and its report. ``to_model(base)`` attaches it to a model.

    ``adapter`` holds per group ``U`` (d_out, r_out), ``V`` (d_in, r_in) and a (r_out, r_in)
    core per module, as :class:`tensorlotr.io.LoTRAdapterFiles`.

    Examples
    --------
    A 2-layer BERT of hidden size 32 whose fine-tune changed each value projection by a
    rank-2 (32, 32) update; at rank 4 the adapter reproduces the fine-tuned model:

    >>> import copy
    >>> import torch
    >>> from transformers import BertConfig, BertModel
    >>> bert = BertConfig(
    ...     vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48
    ... )
    >>> base = BertModel(bert).eval()
    >>> finetuned = copy.deepcopy(base)
    >>> with torch.no_grad():
    ...     for layer in finetuned.encoder.layer:
    ...         layer.attention.self.value.weight += 0.1 * torch.randn(32, 2) @ torch.randn(2, 32)
    >>> result = decompose(base, finetuned, target_modules=["value"], rank=4)
    >>> sorted(result.adapter.tensors)
    ['cores.encoder.layer.0.attention.self.value', 'cores.encoder.layer.1.attention.self.value',
     'factors.value.in_factor', 'factors.value.out_factor']
    >>> lotr = result.to_model(copy.deepcopy(base))
    >>> inputs = torch.tensor([[1, 2, 3]])
    >>> expected = finetuned(input_ids=inputs).last_hidden_state  # (batch, tokens, hidden) = (1, 3, 32)
    >>> torch.allclose(lotr(input_ids=inputs).last_hidden_state, expected, atol=1e-5)
    True
    """

    adapter: LoTRAdapterFiles
    report: DecompositionReport

    def to_model(self, model: nn.Module, is_trainable: bool = False) -> LoTRModel:
        """Attach the adapter to ``model``, the base (or a copy of it), as a :class:`tensorlotr.LoTRModel`.

        The adapter is frozen and the model in eval mode unless ``is_trainable``.

        Examples
        --------
        >>> import copy
        >>> import torch
        >>> from transformers import BertConfig, BertModel
        >>> bert = BertConfig(
        ...     vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48
        ... )
        >>> base = BertModel(bert)
        >>> finetuned = copy.deepcopy(base)
        >>> with torch.no_grad():
        ...     for layer in finetuned.encoder.layer:
        ...         layer.attention.self.query.weight += 0.01 * torch.randn(32, 32)
        >>> result = decompose(base, finetuned, target_modules=["query"], rank=4)
        >>> lotr = result.to_model(base, is_trainable=True)  # fine-tune the adapter further
        >>> lotr.groups["query"].rank, lotr.get_nb_trainable_parameters()[0]  # 4*32 + 4*32 + 2*4*4
        ((4, 4), 288)
        """
        from ..nn.model import LoTRModel

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

                def whole(delta: torch.Tensor = delta) -> Iterable[tuple[int, torch.Tensor]]:
                    return [(0, delta)]

                yield i, whole
            return
        self.passes += 1
        for i in progress(range(len(self.modules)), desc, len(self.modules)):
            key = self.modules[i] + ".weight"
            finetuned, base = self.finetuned.get(key), self.base.get(key)

            def blocks(f: torch.Tensor = finetuned, b: torch.Tensor = base) -> Iterable[tuple[int, torch.Tensor]]:
                return self._blocks(f, b, block_bytes)

            yield i, blocks

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
    """``(d_out, d_in)`` of every 2-d weight whose module matches ``patterns``, in module order."""
    candidates = {k[: -len(".weight")]: s for k, s in base.shapes.items() if k.endswith(".weight") and len(s) == 2}
    found = {m: oriented_shape(s, m in transposed) for m, s in candidates.items() if matches(m, patterns)}
    if not found:
        raise ValueError(no_match_message(patterns, candidates, f"2-d weight of {base.name}"))
    return dict(sorted(found.items(), key=lambda item: module_order(item[0])))


def decompose(
    base: str | os.PathLike[str] | nn.Module | dict[str, torch.Tensor],
    finetuned: str | os.PathLike[str] | nn.Module | dict[str, torch.Tensor],
    out_dir: str | os.PathLike[str] | None = None,
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
    calibration: Calibration | CalibrationStats | None = None,
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
    calibration : Calibration or CalibrationStats, optional
        Output-aware: each group is first decomposed at a working rank (four times ``rank``,
        at least 32), and that factored stack is compressed to ``rank`` by the weighted
        Tucker-2 (:func:`tensorlotr.core.tucker2_weighted`); one more pass gives the exact
        weight error. The output error reported is against the working-rank stack. Needs
        ``rank``; ``base`` must be the model the statistics come from. No heal.

    Returns
    -------
    Decomposition
        ``adapter`` (in memory; ``to_model(base_model)`` attaches it) and ``report``:
        per group layers, shape, ranks, parameters, relative error and energy kept.

    Examples
    --------
    A 2-layer BERT of hidden size 32 whose fine-tune changed the query and value projections:
    each group is a stack of deltas (2, 32, 32), here of rank 2 per layer, so rank 4 is exact.

    >>> import copy
    >>> import torch
    >>> from transformers import BertConfig, BertModel
    >>> bert = BertConfig(
    ...     vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48
    ... )
    >>> base = BertModel(bert)
    >>> finetuned = copy.deepcopy(base)
    >>> with torch.no_grad():
    ...     for layer in finetuned.encoder.layer:
    ...         layer.attention.self.query.weight += 0.01 * torch.randn(32, 2) @ torch.randn(2, 32)
    ...         layer.attention.self.value.weight += 0.01 * torch.randn(32, 2) @ torch.randn(2, 32)
    >>> result = decompose(base, finetuned, "ft-lotr", target_modules=["query", "value"], rank=4)
    >>> [(g.group, g.layers, g.shape, g.rank, g.lotr_params) for g in result.report.groups]  # 4*32 + 4*32 + 2*4*4
    [('query', 2, (32, 32), (4, 4), 288), ('value', 2, (32, 32), (4, 4), 288)]
    >>> result.report.relative_error < 1e-5
    True
    >>> smaller = decompose(base, finetuned, target_modules=["query", "value"], rank=(2, 1))  # no out_dir: in memory
    >>> [g.rank for g in smaller.report.groups], 0 < smaller.report.relative_error < 1
    ([(2, 1), (2, 1)], True)

    The same from saved model folders: ``decompose("base/", "finetuned/", "ft-lotr/",
    target_modules=["q_proj", "v_proj"], energy=0.9)``.
    """
    start = time.perf_counter()
    check_energy(energy)
    if int(n_iter) < 0 or int(n_power) < 0:
        raise ValueError(f"n_iter and n_power must be >= 0, got {n_iter} and {n_power}")
    check_output(out_dir, force, inputs=[p for p in (base, finetuned) if isinstance(p, (str, os.PathLike))])
    progress = progress or no_progress
    pair = normalize_rank(rank)
    base_w, ft_w = open_weights(base, "base"), open_weights(finetuned, "fine-tuned")
    new_keys = _check_architectures(base_w, ft_w)
    transposed = base_w.conv1d_modules | ft_w.conv1d_modules
    shapes = _targets(base_w, target_modules, transposed)
    extra = [m for m in (k.removesuffix(".weight") for k in new_keys) if matches(m, target_modules)]
    if extra:
        raise ValueError(f"{ft_w.name} has targeted modules that {base_w.name} lacks: {extra[:3]}; an extra layer?")
    plan = group_modules(shapes, groups or "by_name")
    cal = as_calibration(calibration)
    if cal is not None and pair is None:
        raise ValueError("decompose with calibration needs a rank (--rank): the weighted fit is at a fixed rank")
    if cal is not None and cal.heal_steps:
        raise ValueError("decompose does not heal; convert a LoRA, or heal the adapter with tensorlotr.heal")
    stats = cal.statistics(list(shapes), progress) if cal is not None else None

    def decompose_group(group: Group) -> GroupOutcome:
        deltas = _Deltas(base_w, ft_w, list(group.modules), group.modules[0] in transposed, dtype)
        if cal is not None and stats is not None and pair is not None and cal.objective == "output":
            (d_out, d_in), n_layers = group.shape, len(group.modules)
            work = min(max(4 * max(pair), 32), d_out, d_in)
            start_tucker, norm_sq, route = tucker2_streaming(
                deltas, group.shape, (min(work, n_layers * d_in), min(work, n_layers * d_out)), n_iter=n_iter,
                gram_max_dim=gram_max_dim, oversample=oversample, n_power=n_power, seed=seed, progress=progress,
                name=group.name,
            )  # fmt: skip
            return _calibrated_group(deltas, start_tucker, norm_sq, route, pair, stats.factors(group.modules), cal)
        tucker, norm_sq, route = tucker2_streaming(
            deltas, group.shape, pair, energy=energy, n_iter=n_iter, gram_max_dim=gram_max_dim,
            oversample=oversample, n_power=n_power, max_rank=max_rank, seed=seed, progress=progress, name=group.name,
        )  # fmt: skip
        kept_sq = float(torch.as_tensor(tucker.core).to(torch.float64).square().sum())
        error_sq = max(norm_sq - kept_sq, 0.0)
        if error_sq < NEAR_EXACT * norm_sq:  # the difference is all rounding: measure the residual itself
            error_sq = _residual_sq(deltas, tucker, progress, group.name)
        details = {"energy_kept": kept_sq / norm_sq if norm_sq > 0 else 1.0, "route": route, "passes": deltas.passes}
        return GroupOutcome(tucker, norm_sq, error_sq, deltas.transposed, details)

    done = run_plan(plan, decompose_group, progress=progress, desc="decomposing", rank=None if energy else pair)
    if done.norm_sq == 0.0:
        raise ValueError(
            f"{ft_w.name} equals {base_w.name} in every targeted module: all deltas are zero, nothing to decompose"
        )
    changed = _changed_tensors(base_w, ft_w, {m + ".weight" for m in shapes}, new_keys, progress)
    saved = (
        done.builder.add_saved({c["key"]: ft_w.get(c["key"]).clone() for c in changed}) if save_changed_modules else []
    )
    base_info = {
        "name_or_path": str(base) if isinstance(base, (str, os.PathLike)) else None,
        "model_type": base_w.config.get("model_type"),
        "class": type(base).__name__
        if isinstance(base, nn.Module)
        else (base_w.config.get("architectures") or [None])[0],
    }
    adapter = done.builder.build(target_modules, groups or "by_name", saved, base_info)
    save_adapter(adapter, out_dir, force=force)
    report = DecompositionReport(
        source=ft_w.name,
        base=base_w.name,
        finetuned=ft_w.name,
        output=str(out_dir) if out_dir is not None else None,
        groups=done.groups,
        changed_modules=changed,
        modules_to_save=saved,
        relative_error=done.relative_error,
        seconds=time.perf_counter() - start,
        notes=done.notes,
        adapter=adapter,
    )
    return Decomposition(adapter, report)


def _calibrated_group(
    deltas: _Deltas,
    start: Tucker2,
    norm_sq: float,
    route: str,
    rank: tuple[int, int],
    factors: list[torch.Tensor],
    cal: Calibration,
) -> GroupOutcome:
    """The weighted Tucker-2 at ``rank`` of the working-rank stack ``start`` (as LoRA factors ``U0 G0_l``, ``V0^T``).

    The weight error is exact, from one more pass: ``||dW||^2 - 2 sum_l <U^T dW_l V, G_l> + ||G||^2``.
    """
    u0, v0 = torch.as_tensor(start.out_factor).double(), torch.as_tensor(start.in_factor).double()
    bs = [u0 @ core for core in torch.as_tensor(start.core).double()]
    as_ = [v0.T] * len(bs)
    rank = (min(rank[0], int(u0.shape[1])), min(rank[1], int(v0.shape[1])))
    tucker = tucker2_weighted(bs, as_, factors, rank, damping=cal.damping, n_iter=cal.n_iter)
    u, core, v = torch.as_tensor(tucker.out_factor), torch.as_tensor(tucker.core), torch.as_tensor(tucker.in_factor)
    cross = sum(float(((u.T @ delta.double() @ v) * core[i]).sum()) for i, delta in deltas.layers(no_progress, "error"))
    error_sq = max(norm_sq - 2 * cross + float(core.square().sum()), 0.0)
    output = error_sums(tucker, bs, as_, [1.0] * len(bs), factors).output_error
    details = {
        "energy_kept": 1 - error_sq / norm_sq if norm_sq > 0 else 1.0,
        "route": f"{route}+calibrated",
        "passes": deltas.passes,
        "output_error": output,
    }
    return GroupOutcome(tucker, norm_sq, error_sq, deltas.transposed, details)


#: Below this share of the squared norm, ``||dW||^2 - ||G||^2`` (float32 cores) is rounding, not error.
NEAR_EXACT = 1e-6


def _residual_sq(deltas: _Deltas, tucker: Tucker2, progress: Progress, name: str) -> float:
    """``sum_l ||dW_l - U G_l V^T||_F^2`` in float64, from one more pass over the weights."""
    u, v = (torch.as_tensor(f).to(torch.float64) for f in (tucker.out_factor, tucker.in_factor))
    cores = torch.as_tensor(tucker.core).to(torch.float64)
    total = 0.0
    for i, delta in deltas.layers(progress, f"{name}: exact error"):
        total += float((delta.to(torch.float64) - u @ cores[i] @ v.T).square().sum())
    return total


def _changed_tensors(
    base_w: WeightSource, ft_w: WeightSource, target_keys: set[str], new_keys: list[str], progress: Progress
) -> list[ChangedTensor]:
    """The other tensors that differ between the two models, with their relative change."""
    changed: list[ChangedTensor] = []
    others = [k for k in base_w.shapes if k not in target_keys]
    for key in progress(others, "other tensors", len(others)):
        before, after = base_w.get(key), ft_w.get(key)
        if not torch.equal(before, after):
            diff = (after.to(torch.float64) - before.to(torch.float64)).norm()
            rel = float(diff / before.to(torch.float64).norm()) if before.numel() and before.any() else float("inf")
            changed.append(ChangedTensor(key=key, shape=list(before.shape), relative_change=rel))
    return changed + [ChangedTensor(key=key, shape=list(ft_w.shapes[key]), relative_change=None) for key in new_keys]
