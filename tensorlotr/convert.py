"""PEFT LoRA <-> LoTR: ``convert_lora``, ``export_lora`` and ``inspect_adapter``.

Conversion stacks the LoRA updates of each group (one projection type across layers) and
takes their Tucker-2 with :func:`tensorlotr.tucker2_lowrank`, never forming a dense update.
Export is exact: ``U G_l V^T`` is a LoRA of rank ``min(r_out, r_in)``.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ._adapter import adapter_config, store_group
from .core import relative_error_lowrank, tucker2_lowrank
from .core.hosvd import lowrank_norm_sq
from .io.atomic import atomic_dir, check_output
from .io.lotr_format import is_lotr_dir, read_adapter, write_adapter
from .io.peft_lora import CONFIG_NAME as PEFT_CONFIG_NAME
from .io.peft_lora import PREFIX, PeftLoRA, write_peft_lora
from .layout import GroupLayout, LoTRAdapterFiles
from .nn.targets import group_modules
from .progress import Progress, no_progress


@dataclass
class GroupReport:
    """One group of a conversion: the LoRA it came from and the LoTR it became."""

    group: str
    layers: int
    shape: tuple[int, int]
    lora_rank: str
    rank: tuple[int, int]
    lora_params: int
    lotr_params: int
    relative_error: float
    seconds: float


@dataclass
class ConversionReport:
    """What :func:`convert_lora` (or ``decompose``) wrote, and what it cost."""

    source: str
    output: str | None
    groups: list[GroupReport]
    modules_to_save: list[str] = field(default_factory=list)
    seconds: float = 0.0
    relative_error: float = 0.0  # over all groups: sqrt(sum err_g^2 ||dW_g||^2 / sum ||dW_g||^2)

    @property
    def lora_params(self) -> int:
        return sum(g.lora_params for g in self.groups)

    @property
    def lotr_params(self) -> int:
        return sum(g.lotr_params for g in self.groups)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["totals"] = {
            "lora_params": self.lora_params,
            "lotr_params": self.lotr_params,
            "compression": self.lora_params / max(self.lotr_params, 1),
            "relative_error": self.relative_error,
        }
        return data

    def table(self) -> str:
        from .report import format_table

        rows = [
            {
                "group": g.group,
                "layers": g.layers,
                "shape": g.shape,
                "LoRA rank": g.lora_rank,
                "LoTR rank": g.rank,
                "LoRA params": g.lora_params,
                "LoTR params": g.lotr_params,
                "rel. error": g.relative_error,
            }
            for g in self.groups
        ]
        rows.append(
            {
                "group": "total",
                "layers": sum(g.layers for g in self.groups),
                "shape": "",
                "LoRA rank": "",
                "LoTR rank": "",
                "LoRA params": self.lora_params,
                "LoTR params": self.lotr_params,
                "rel. error": self.relative_error,
            }
        )
        summary = (
            f"{self.lora_params:,} LoRA params -> {self.lotr_params:,} LoTR params "
            f"(compression {self.lora_params / max(self.lotr_params, 1):.1f}x), "
            f"relative error {self.relative_error:.3e}, {self.seconds:.2f} s"
        )
        if self.output:
            summary += f"; wrote {self.output}"
        return format_table(rows) + "\n" + summary


def _lora_rank_text(ranks: list[int]) -> str:
    low, high = min(ranks), max(ranks)
    return str(low) if low == high else f"{low}-{high}"


def convert_lora(
    peft_dir: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    *,
    rank: int | tuple[int, int] | None = None,
    energy: float | None = None,
    n_iter: int = 0,
    groups: str | dict[str, list[str]] = "by_name",
    force: bool = False,
    progress: Progress | None = None,
) -> ConversionReport:
    """Convert a PEFT LoRA folder into a LoTR adapter folder.

    Parameters
    ----------
    peft_dir : path
        A folder with ``adapter_config.json`` and ``adapter_model.safetensors`` (or a
        weights-only ``adapter_model.bin``).
    out_dir : path, optional
        Where to write the LoTR adapter (``LoTRModel.from_pretrained`` loads it). It is
        written to a temporary folder and renamed into place; an existing folder is
        refused unless ``force``. ``None`` only computes the report.
    rank : int or (r_out, r_in), optional
        Tucker ranks for every group; ``None`` keeps the exact rank (at most the sum of
        the group's LoRA ranks), so the conversion is lossless.
    energy : float, optional
        Per group and mode, the smallest rank keeping this fraction of the squared
        singular values; ``rank`` then caps it. Groups may end with different ranks.
    n_iter : int
        HOOI sweeps after the HOSVD.
    groups : "by_name", "shared" or dict
        As :class:`tensorlotr.LoTRConfig`'s ``groups``: by default one group per module
        path with the layer index removed (and per shape).

    Returns
    -------
    ConversionReport
        Per group: layers, shape, LoRA and LoTR parameters, ranks, and the exact relative
        error (computed in factored form), then the totals.
    """
    start = time.perf_counter()
    check_output(out_dir, force)
    lora = PeftLoRA(peft_dir)
    progress = progress or no_progress
    plan = group_modules({m.name: m.shape for m in lora.modules.values()}, groups)
    layouts: dict[str, GroupLayout] = {}
    tensors: dict[str, torch.Tensor] = {}
    reports: list[GroupReport] = []
    err_sq = ref_sq = 0.0
    for group in progress(plan, "converting", len(plan)):
        group_start = time.perf_counter()
        names = list(group.modules)
        bs, as_, scales = lora.load(names)
        bs = [b.float() if b.dtype != torch.float64 else b for b in bs]
        as_ = [a.float() if a.dtype != torch.float64 else a for a in as_]
        tucker = tucker2_lowrank(bs, as_, rank, scale=scales, energy=energy, n_iter=n_iter)
        error = relative_error_lowrank(tucker, bs, as_, scales)
        norm_sq = lowrank_norm_sq(bs, as_, scales)
        err_sq += error**2 * norm_sq if math.isfinite(error) else 0.0
        ref_sq += norm_sq
        store_group(tensors, layouts, group.name, names, tucker, fan_in_fan_out=lora.fan_in_fan_out)
        reports.append(
            GroupReport(
                group=group.name,
                layers=len(names),
                shape=group.shape,
                lora_rank=_lora_rank_text([lora.modules[n].rank for n in names]),
                rank=tucker.rank,
                lora_params=sum(lora.modules[n].n_params for n in names),
                lotr_params=tucker.n_params,
                relative_error=error,
                seconds=time.perf_counter() - group_start,
            )
        )
    saved = lora.load_modules_to_save()
    for key, tensor in saved.items():
        tensors[f"modules_to_save.{key}"] = tensor
    modules_to_save = sorted({key.rsplit(".", 1)[0] for key in saved})
    report = ConversionReport(
        source=str(peft_dir),
        output=str(out_dir) if out_dir is not None else None,
        groups=reports,
        modules_to_save=modules_to_save,
        relative_error=math.sqrt(err_sq / ref_sq) if ref_sq > 0 else 0.0,
    )
    if out_dir is not None:
        config = adapter_config(layouts, lora.config.get("target_modules"), groups, modules_to_save)
        base = {"name_or_path": lora.config.get("base_model_name_or_path"), "task_type": lora.config.get("task_type")}
        files = LoTRAdapterFiles(config.to_dict(), layouts, tensors, base)
        with atomic_dir(out_dir, force=force) as tmp:
            write_adapter(tmp, files)
    report.seconds = time.perf_counter() - start
    return report


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


def export_lora(lotr: str | os.PathLike | Any, out_dir: str | os.PathLike, *, force: bool = False) -> dict[str, Any]:
    """Write a LoTR adapter as a PEFT LoRA folder, exactly.

    ``dW_l = scale U G_l V^T`` becomes a LoRA of rank ``r = min(r_out, r_in)``: with
    ``r_in <= r_out``, ``B_l = scale U G_l`` (d_out, r_in) and ``A_l = V^T``; otherwise
    ``B_l = U`` and ``A_l = scale G_l V^T``. ``lora_alpha = r`` so PEFT's scale is 1, and
    groups of different ranks get ``rank_pattern`` / ``alpha_pattern`` entries.

    Parameters
    ----------
    lotr : path or LoTRModel
        A LoTR adapter folder or a model with adapters attached.
    out_dir : path
        Written atomically; an existing folder needs ``force``.

    Returns
    -------
    dict
        A summary: modules, ranks by group, LoRA parameters, output path.
    """
    check_output(out_dir, force)
    files = read_adapter(lotr) if isinstance(lotr, (str, os.PathLike)) else lotr.adapter_files()
    source = str(lotr) if isinstance(lotr, (str, os.PathLike)) else type(lotr).__name__
    tensors: dict[str, torch.Tensor] = {}
    rank_of_module: dict[str, int] = {}
    fan_in_fan_out = False
    for name, group in files.groups.items():
        u = files.factor(name, "out_factor").detach().float()
        v = files.factor(name, "in_factor").detach().float()
        r_out, r_in = group.rank
        fan_in_fan_out |= group.fan_in_fan_out
        for module in group.modules:
            core = group.scale * files.core(module).detach().float()
            if r_in <= r_out:
                b, a = u @ core, v.T
            else:
                b, a = u, core @ v.T
            # the factors are shared by the group's modules; PEFT stores one copy per module
            tensors[f"{PREFIX}{module}.lora_A.weight"] = a.clone().contiguous()
            tensors[f"{PREFIX}{module}.lora_B.weight"] = b.clone().contiguous()
            rank_of_module[module] = min(r_out, r_in)
    for key, tensor in files.modules_to_save.items():
        tensors[f"{PREFIX}{key}"] = tensor
    ranks = sorted(set(rank_of_module.values()))
    default_rank = max(ranks, key=lambda r: sum(v == r for v in rank_of_module.values()))
    others = {m: r for m, r in rank_of_module.items() if r != default_rank}
    config = {
        "peft_type": "LORA",
        "task_type": files.base_model.get("task_type") or _task_type(files.base_model.get("class")),
        "base_model_name_or_path": files.base_model.get("name_or_path"),
        "r": default_rank,
        "lora_alpha": default_rank,
        "rank_pattern": {rf"{m}": r for m, r in others.items()},
        "alpha_pattern": {rf"{m}": r for m, r in others.items()},
        "target_modules": sorted(rank_of_module),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": fan_in_fan_out,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": sorted({k.rsplit(".", 1)[0] for k in files.modules_to_save}) or None,
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
    }
    with atomic_dir(out_dir, force=force) as tmp:
        write_peft_lora(tmp, config, tensors)
    return {
        "source": source,
        "output": str(out_dir),
        "modules": len(rank_of_module),
        "ranks": {name: min(g.rank) for name, g in files.groups.items()},
        "lora_params": sum(t.numel() for k, t in tensors.items() if ".lora_" in k),
        "modules_to_save": config["modules_to_save"],
    }


def inspect_adapter(path: str | os.PathLike) -> dict[str, Any]:
    """Groups, shapes, ranks, parameters and dtype of a LoTR or PEFT LoRA folder."""
    folder = Path(path)
    if is_lotr_dir(folder):
        files = read_adapter(folder)
        groups = []
        for name, g in files.groups.items():
            (d_out, d_in), (r_out, r_in) = g.shape, g.rank
            groups.append(
                {
                    "group": name,
                    "layers": len(g.modules),
                    "shape": [d_out, d_in],
                    "rank": [r_out, r_in],
                    "params": r_out * d_out + r_in * d_in + len(g.modules) * r_out * r_in,
                    "dtype": str(files.factor(name, "out_factor").dtype).removeprefix("torch."),
                }
            )
        extra = sum(t.numel() for t in files.modules_to_save.values())
        return {"format": "lotr", "path": str(folder), "groups": groups, "modules_to_save_params": extra}
    if (folder / PEFT_CONFIG_NAME).is_file():
        lora = PeftLoRA(folder)
        plan = group_modules({m.name: m.shape for m in lora.modules.values()}, "by_name")
        groups = []
        for group in plan:
            ranks = [lora.modules[n].rank for n in group.modules]
            groups.append(
                {
                    "group": group.name,
                    "layers": len(group.modules),
                    "shape": list(group.shape),
                    "rank": _lora_rank_text(ranks),
                    "params": sum(lora.modules[n].n_params for n in group.modules),
                    "dtype": lora.dtype,
                }
            )
        return {
            "format": "peft-lora",
            "path": str(folder),
            "groups": groups,
            "modules_to_save": lora.modules_to_save,
        }
    raise FileNotFoundError(f"{folder} holds neither lotr_config.json nor {PEFT_CONFIG_NAME}")
