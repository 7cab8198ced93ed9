"""``convert_original``: a checkpoint of the original LoTR code (daskol/lotr) written as a LoTR adapter.

The original code's adapter already is a Tucker-2 with shared factors, so nothing is
decomposed: :func:`tensorlotr.io.original_format.read_original` reads it exactly against the
base model, and the adapter is written as ``convert`` writes one.
"""

from __future__ import annotations

import os
import time

import torch
from torch import nn

from ..files.atomic import check_output
from ..io.original_format import is_original_checkpoint, read_original
from .driver import AdapterReport, GroupReport, save_adapter

__all__ = ["convert_original", "is_original_checkpoint"]


def convert_original(
    checkpoint: str | os.PathLike[str] | dict[str, torch.Tensor],
    base_model: str | os.PathLike[str] | nn.Module | dict[str, torch.Tensor],
    out_dir: str | os.PathLike[str] | None = None,
    *,
    scale: float = 1.0,
    force: bool = False,
) -> AdapterReport:
    """Write a checkpoint of the original LoTR code as a LoTR adapter folder, exactly.

    Parameters
    ----------
    checkpoint : path or dict
        The state dict of the model trained with the original code (``….lotr.lhs``,
        ``….lotr.mid``, ``….lotr.rhs`` and ``….linear.weight`` per adapted layer): a
        ``torch.save`` file, a ``.safetensors`` file, a model folder, or the dict.
    base_model : path, nn.Module or dict
        The base model it was trained from; its frozen layers must equal the checkpoint's.
    out_dir : path, optional
        The adapter folder to write (``LoTRModel.from_pretrained`` loads it), atomically; an
        existing one needs ``force``. ``None`` only reports.
    scale : float
        The ``scale`` of the original ``LoTRLinear`` layers (1 by default); the update is
        ``scale / r`` times their product.

    Returns
    -------
    AdapterReport
        One row per group of shared factors (layers, shape, rank, parameters; the relative
        error is 0), the ``modules_to_save`` found, and the adapter in memory.

    Examples
    --------
    A 2-layer BERT whose query and value projections share one pair of factors of rank 2,
    as the original code trains them (each layer with its own core ``mid``):

    >>> import torch
    >>> from transformers import BertConfig, BertModel
    >>> bert = BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
    ...                             intermediate_size=48))
    >>> state = dict(bert.state_dict())
    >>> lhs, rhs = torch.randn(2, 32), torch.randn(32, 2)
    >>> for layer in range(2):
    ...     for proj in ("query", "value"):
    ...         path = f"encoder.layer.{layer}.attention.self.{proj}"
    ...         state[f"{path}.linear.weight"] = state.pop(f"{path}.weight")
    ...         state[f"{path}.linear.bias"] = state.pop(f"{path}.bias")
    ...         state.update({f"{path}.lotr.lhs": lhs, f"{path}.lotr.mid": torch.randn(2, 2), f"{path}.lotr.rhs": rhs})
    >>> report = convert_original(state, bert, "from-original")
    >>> [(g.group, g.layers, g.rank, g.lotr_params) for g in report.groups]
    [('query_value', 4, (2, 2), 144)]
    """
    start = time.perf_counter()
    sources = [checkpoint] if isinstance(checkpoint, (str, os.PathLike)) else []
    sources += [base_model] if isinstance(base_model, (str, os.PathLike)) else []
    check_output(out_dir, force, inputs=sources)
    files = read_original(checkpoint, base_model, scale=scale)
    rows = []
    for name, g in files.groups.items():
        row = GroupReport(group=name, layers=len(g.modules), shape=g.shape, rank=g.rank, lotr_params=g.n_params,
                          relative_error=0.0, seconds=0.0)  # fmt: skip
        rows.append(row)
    report = AdapterReport(
        source=str(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else "state dict",
        output=str(out_dir) if out_dir is not None else None,
        groups=rows,
        modules_to_save=sorted({k.rsplit(".", 1)[0] for k in files.modules_to_save}),
        notes=[f"read exactly from the original LoTR code's checkpoint (scale {scale:g} / rank)"],
        adapter=files,
    )
    save_adapter(files, out_dir, force=force)
    report.seconds = time.perf_counter() - start
    return report
