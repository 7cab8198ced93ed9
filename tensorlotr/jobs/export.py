"""LoTR -> PEFT LoRA: ``export_lora``, exact, since ``U G_l V^T`` is a LoRA of rank ``min(r_out, r_in)``."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ..adapter import LoTRAdapterFiles
from ..adapter.layout import expected_shapes
from ..files.atomic import atomic_dir, check_output
from ..io import read_adapter
from ..io.peft_lora import lora_config, lora_keys, saved_tensor_key, write_peft_lora
from ..io.zoo_format import is_zoo_dir, read_zoo
from ..report import Result

if TYPE_CHECKING:
    from ..nn.model import LoTRModel


#: The dtypes that ``dtype=`` (``--dtype``) of convert and export may name for the tensors written.
OUTPUT_DTYPES = ("float32", "float64", "float16", "bfloat16")


def output_dtype(sources: Iterable[torch.dtype], requested: str | torch.dtype | None = None) -> torch.dtype:
    """The dtype convert and export write: ``requested``, else the source's own.

    The source's own is the widest floating dtype among ``sources``, and at least float32:
    the decomposition computes in float32 (float64 for float64 sources), so a float16 or
    bfloat16 source is written in float32 rather than rounded again.

    Examples
    --------
    >>> import torch
    >>> output_dtype([torch.float64]), output_dtype([torch.bfloat16]), output_dtype([torch.float64], "float32")
    (torch.float64, torch.float32, torch.float32)
    >>> output_dtype([torch.float32], "int8")
    Traceback (most recent call last):
    ValueError: dtype must be one of ('float32', 'float64', 'float16', 'bfloat16'), got 'int8'
    """
    if requested is not None:
        name = str(requested).removeprefix("torch.")
        if name not in OUTPUT_DTYPES:
            raise ValueError(f"dtype must be one of {OUTPUT_DTYPES}, got {requested!r}")
        dtype: torch.dtype = getattr(torch, name)
        return dtype
    widest = torch.float32
    for source in sources:
        if source.is_floating_point and torch.finfo(source).bits > torch.finfo(widest).bits:
            widest = source
    return widest


def _task_type(model_class: str | None) -> str | None:
    if not model_class:
        return None
    for suffix, task in (
        ("ForSequenceClassification", "SEQ_CLS"),
        ("ForCausalLM", "CAUSAL_LM"),
        ("LMHeadModel", "CAUSAL_LM"),
        ("ForTokenClassification", "TOKEN_CLS"),
        ("ForQuestionAnswering", "QUESTION_ANS"),
        ("ForConditionalGeneration", "SEQ_2_SEQ_LM"),
    ):
        if model_class.endswith(suffix):
            return task
    return None


@dataclass(kw_only=True)
class ExportReport(Result):
    """What :func:`export_lora` wrote: the PEFT LoRA's modules, ranks by group and parameters.

    Examples
    --------
    >>> from tensorlotr import convert_lora
    >>> _ = convert_lora("my-lora", "lotr-a")
    >>> print(export_lora("lotr-a", "lora-a"))
    wrote PEFT LoRA lora-a: 4 modules (q_proj: r=8, v_proj: r=8), 2,048 params
    """

    source: str
    output: str
    modules: int
    ranks: dict[str, int]
    lora_params: int
    modules_to_save: list[str] = field(default_factory=list)

    def text(self) -> str:
        ranks = ", ".join(f"{g}: r={r}" for g, r in self.ranks.items())
        return f"wrote PEFT LoRA {self.output}: {self.modules} modules ({ranks}), {self.lora_params:,} params"


def export_lora(
    lotr: str | os.PathLike[str] | LoTRModel,
    out_dir: str | os.PathLike[str],
    *,
    adapter: str | None = None,
    force: bool = False,
    dtype: str | torch.dtype | None = None,
) -> ExportReport:
    """Write a LoTR adapter as a PEFT LoRA folder, exactly.

    ``dW_l = scale U G_l V^T`` becomes a LoRA of rank ``r = min(r_out, r_in)``: with
    ``r_in <= r_out``, ``B_l = scale U G_l`` (d_out, r_in) and ``A_l = V^T``; otherwise
    ``B_l = U`` and ``A_l = scale G_l V^T``. ``lora_alpha = r`` so PEFT's scale is 1, and
    groups of different ranks get ``rank_pattern`` / ``alpha_pattern`` entries.

    Parameters
    ----------
    lotr : path or LoTRModel
        A LoTR adapter folder, a zoo folder (with ``adapter``) or a model with adapters attached.
    out_dir : path
        Written atomically; an existing folder needs ``force``.
    adapter : str, optional
        Which adapter of a zoo to export (exact with respect to the zoo).
    dtype : str or torch.dtype, optional
        The dtype of the LoRA factors written (one of :data:`OUTPUT_DTYPES`). Default: the
        adapter's own (its factors' and cores' dtype, at least float32), so a float64 adapter
        gives a float64 LoRA that PEFT runs to the same outputs. ``B_l`` and ``A_l`` are
        computed in float64 and rounded once.

    Returns
    -------
    ExportReport
        Modules, rank by group, LoRA parameters, output path.

    Examples
    --------
    A LoTR adapter of rank (8, 8) on two groups of 2 layers (32 x 32) becomes a LoRA of
    rank 8 on 4 modules: ``B_l`` (32, 8) and ``A_l`` (8, 32) each.

    >>> from tensorlotr import convert_lora
    >>> _ = convert_lora("my-lora", "lotr-b")
    >>> report = export_lora("lotr-b", "lotr-b-as-lora")
    >>> report.modules, report.ranks, report.lora_params
    (4, {'q_proj': 8, 'v_proj': 8}, 2048)
    """
    source_dir = lotr if isinstance(lotr, (str, os.PathLike)) else None
    check_output(out_dir, force, inputs=[source_dir])
    output_dtype([], dtype)  # a bad dtype is refused before anything is read
    files = _adapter_files(lotr, adapter)
    adapter_keys = {k for name, group in files.groups.items() for k in expected_shapes(name, group)}
    lora_dtype = output_dtype([files.tensors[k].dtype for k in adapter_keys], dtype)
    source = str(lotr) if isinstance(lotr, (str, os.PathLike)) else type(lotr).__name__
    source += f" (adapter {adapter})" if adapter else ""
    tensors: dict[str, torch.Tensor] = {}
    rank_of_module: dict[str, int] = {}
    ranks: dict[str, int] = {}  # by group: the rank of the LoRA view, min(r_out, r_in)
    fan_in_fan_out = False
    for name, group in files.groups.items():
        fan_in_fan_out |= group.fan_in_fan_out
        for module, (b, a) in files.lora_factors(name, dtype=torch.float64).items():
            key_a, key_b = lora_keys(module)
            # the factors are shared by the group's modules; PEFT stores one copy per module
            tensors[key_a], tensors[key_b] = a.to(lora_dtype).contiguous(), b.to(lora_dtype).contiguous()
            rank_of_module[module] = ranks[name] = int(a.shape[0])
    for key, tensor in files.modules_to_save.items():
        tensors[saved_tensor_key(key)] = tensor
    modules_to_save = sorted({k.rsplit(".", 1)[0] for k in files.modules_to_save})
    task_type = files.base_model.get("task_type") or _task_type(files.base_model.get("class"))
    config = lora_config(
        rank_of_module, fan_in_fan_out, modules_to_save, task_type, files.base_model.get("name_or_path")
    )
    with atomic_dir(out_dir, force=force) as tmp:
        write_peft_lora(tmp, config, tensors)
    return ExportReport(
        source=source,
        output=str(out_dir),
        modules=len(rank_of_module),
        ranks=ranks,
        lora_params=sum(t.numel() for k, t in tensors.items() if ".lora_" in k),
        modules_to_save=modules_to_save,
    )


def _adapter_files(lotr: str | os.PathLike[str] | LoTRModel, adapter: str | None) -> LoTRAdapterFiles:
    """The adapter to export: a LoTR folder, one adapter of a zoo folder, or a model's adapter."""
    if not isinstance(lotr, (str, os.PathLike)):
        return lotr.adapter_files() if adapter is None else lotr.adapter_files(adapter)
    if is_zoo_dir(lotr):
        zoo = read_zoo(lotr)
        if adapter is None:
            raise ValueError(f"{lotr} is a zoo of {len(zoo.adapters)} adapters; choose one with --adapter NAME")
        if adapter not in zoo.adapters:
            raise ValueError(f"the zoo {lotr} has no adapter {adapter!r}; its adapters: {', '.join(zoo.adapters)}")
        return zoo.adapter(adapter)
    if adapter is not None:
        raise ValueError(f"{lotr} is a single LoTR adapter, not a zoo; drop --adapter")
    return read_adapter(lotr)
