"""PEFT LoRA <-> LoTR: ``convert_lora``, ``export_lora`` and ``inspect_adapter``.

Conversion stacks the LoRA updates of each group (one projection type across layers) and
takes their Tucker-2 with :func:`tensorlotr.tucker2_lowrank`, never forming a dense update.
Export is exact: ``U G_l V^T`` is a LoRA of rank ``min(r_out, r_in)``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .adapter import Group, LoTRAdapterFiles, group_modules
from .calibration import (
    REPORT_NAME,
    Calibration,
    CalibrationStats,
    ErrorSums,
    add_report_columns,
    as_calibration,
    compression_document,
    error_sums,
    group_tucker,
)
from .core import lowrank_norm_sq, normalize_rank, relative_error_lowrank, tucker2_lowrank, tucker2_weighted
from .driver import AdapterReport, GroupOutcome, run_plan, save_adapter
from .io import is_lotr_dir, read_adapter
from .io.atomic import atomic_dir, check_output
from .io.peft_lora import CONFIG_NAME as PEFT_CONFIG_NAME
from .io.peft_lora import PeftLoRA, lora_config, lora_keys, saved_tensor_key, write_peft_lora
from .io.zoo_format import is_zoo_dir, read_zoo
from .progress import Progress
from .report import Result, format_table


@dataclass(kw_only=True)
class ConversionReport(AdapterReport):
    """What :func:`convert_lora` wrote: per group the LoRA it came from and the LoTR it became.

    Examples
    --------
    ``my-lora/`` holds a PEFT LoRA of rank 4 on ``q_proj`` and ``v_proj`` of a 2-layer model
    of hidden size 32:

    >>> report = convert_lora("my-lora", None)  # out_dir None: the report only
    >>> report.to_dict()["groups"][0]["rank"], report["totals"]["compression"]
    ([8, 8], 0.8)
    """


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
    calibration: Calibration | CalibrationStats | None = None,
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
    calibration : Calibration or CalibrationStats, optional
        Output-aware compression (see ``docs/calibration.md``): each group minimises the
        error of its outputs on the calibration inputs, ``sum_l ||(dW_l - U G_l V^T) C_l^{1/2}||``
        (:func:`tensorlotr.core.tucker2_weighted`), instead of the weight error; with
        ``heal_steps`` the adapter is then healed against the LoRA (:mod:`tensorlotr.heal`).
        The report adds each group's calibrated output error (before and after the heal),
        and the output folder gets ``compression_report.json``, which ``inspect`` shows.

    Returns
    -------
    ConversionReport
        Per group: layers, shape, LoRA and LoTR parameters, ranks, and the exact relative
        error (computed in factored form), then the totals.

    Examples
    --------
    ``my-lora/`` holds a PEFT LoRA of rank 4 on ``q_proj`` and ``v_proj`` of a 2-layer model
    of hidden size 32: each group is a stack (2, 32, 32) of rank at most 2 x 4 = 8 per mode.

    >>> report = convert_lora("my-lora", "my-lotr")  # the exact rank: lossless
    >>> [(g.group, g.rank, g.lotr_params, g.lora_params) for g in report.groups]
    [('q_proj', (8, 8), 640, 512), ('v_proj', (8, 8), 640, 512)]
    >>> report.relative_error < 1e-6
    True
    >>> smaller = convert_lora("my-lora", "my-lotr-r4", rank=4)  # 4*32 + 4*32 + 2*4*4 per group
    >>> [(g.rank, g.lotr_params) for g in smaller.groups]
    [((4, 4), 288), ((4, 4), 288)]

    Two layers are too shallow for LoTR to save parameters; see the parameter counts in the
    documentation's Concepts page.
    """
    start = time.perf_counter()
    requested = normalize_rank(rank)
    check_output(out_dir, force, inputs=[peft_dir])
    if is_zoo_dir(peft_dir):
        raise ValueError(
            f"{peft_dir} is a LoTR zoo, not a PEFT LoRA; export-lora --adapter NAME gives one of its LoRAs"
        )
    if is_lotr_dir(peft_dir):
        raise ValueError(f"{peft_dir} is a LoTR adapter already, not a PEFT LoRA")
    lora = PeftLoRA(peft_dir)
    plan = group_modules({m.name: m.shape for m in lora.modules.values()}, groups)
    cal = as_calibration(calibration)
    stats = cal.statistics(list(lora.modules), progress) if cal is not None else None
    sums: dict[str, ErrorSums] = {}

    def convert_group(group: Group) -> GroupOutcome:
        names = list(group.modules)
        bs, as_, scales = lora.load(names)
        bs = [b.float() if b.dtype != torch.float64 else b for b in bs]
        as_ = [a.float() if a.dtype != torch.float64 else a for a in as_]
        # the stack has rank at most sum_l r_l in both modes: never pad beyond it
        (d_out, d_in), total = group.shape, sum(lora.modules[n].rank for n in names)
        exact = (min(d_out, len(names) * d_in, total), min(d_in, len(names) * d_out, total))
        clipped = None if requested is None else (min(requested[0], exact[0]), min(requested[1], exact[1]))
        factors = stats.factors(names) if stats is not None else None
        if cal is None or factors is None or cal.objective == "weight":
            tucker = tucker2_lowrank(bs, as_, clipped, scale=scales, energy=energy, n_iter=n_iter)
        else:  # output-aware: float64, as the calibration statistics
            b64, a64 = [b.double() for b in bs], [a.double() for a in as_]
            tucker = tucker2_weighted(
                b64, a64, factors, clipped, scale=scales, energy=energy, damping=cal.damping, n_iter=cal.n_iter
            )
        norm_sq = lowrank_norm_sq(bs, as_, scales)
        error = relative_error_lowrank(tucker, bs, as_, scales)
        lora_rank = max(lora.modules[n].rank for n in names)
        details = {"lora_rank": (lora_rank, lora_rank), "lora_params": sum(lora.modules[n].n_params for n in names)}
        if factors is not None:
            sums[group.name] = error_sums(tucker, bs, as_, scales, factors)
            details["output_error"] = sums[group.name].output_error
        return GroupOutcome(tucker, norm_sq, error**2 * norm_sq, lora.fan_in_fan_out, details)

    done = run_plan(plan, convert_group, progress=progress, desc="converting", rank=None if energy else requested)
    modules_to_save = done.builder.add_saved(lora.load_modules_to_save())
    base = {"name_or_path": lora.config.get("base_model_name_or_path"), "task_type": lora.config.get("task_type")}
    files = done.builder.build(lora.config.get("target_modules"), groups, modules_to_save, base)
    heal = None
    if cal is not None and cal.heal_steps:
        files, heal = _heal(files, lora, cal, done.groups, progress)
        done.notes.append(heal.text())
    report = ConversionReport(
        source=str(peft_dir),
        output=str(out_dir) if out_dir is not None else None,
        groups=done.groups,
        modules_to_save=modules_to_save,
        relative_error=done.relative_error,
        seconds=time.perf_counter() - start,
        notes=done.notes,
        output_error=sum(sums.values(), ErrorSums()).output_error if sums else None,
        calibration=stats.summary() if stats is not None else None,
        heal=heal.to_dict() if heal is not None else None,
        adapter=files,
    )
    documents = {REPORT_NAME: compression_document(report)} if cal is not None else None
    save_adapter(files, out_dir, force=force, documents=documents)
    report.seconds = time.perf_counter() - start
    return report


def _heal(files: LoTRAdapterFiles, lora: PeftLoRA, cal: Calibration, rows: list[Any], progress: Progress | None):
    """Heal the converted adapter against the LoRA; set each group's errors after the heal in ``rows``."""
    from .heal import LoRATeacher, heal_adapter  # the torch bindings, only when healing

    names = list(lora.modules)
    bs, as_, scales = lora.load(names)
    teacher = LoRATeacher(
        {n: (b.float(), a.float(), s) for n, b, a, s in zip(names, bs, as_, scales, strict=True)},
        lora.load_modules_to_save(),
    )
    assert cal.base_model is not None and cal.inputs is not None and cal.stats is not None
    healed, report = heal_adapter(
        cal.base_model, files, teacher, cal.inputs, steps=cal.heal_steps, lr=cal.heal_lr,
        train_factors=cal.heal_factors, held_out=cal.held_out, progress=progress,
    )  # fmt: skip
    for row in rows:
        modules = healed.groups[row.group].modules
        b, a, s = lora.load(modules)
        sums = error_sums(group_tucker(healed, row.group), b, a, s, cal.stats.factors(modules))
        row.healed_error, row.healed_output_error = sums.weight_error, sums.output_error
    return healed, report


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
    lotr: str | os.PathLike | Any, out_dir: str | os.PathLike, *, adapter: str | None = None, force: bool = False
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

    Returns
    -------
    ExportReport
        Modules, rank by group, LoRA parameters, output path.

    Examples
    --------
    A LoTR adapter of rank (8, 8) on two groups of 2 layers (32 x 32) becomes a LoRA of
    rank 8 on 4 modules: ``B_l`` (32, 8) and ``A_l`` (8, 32) each.

    >>> _ = convert_lora("my-lora", "lotr-b")
    >>> report = export_lora("lotr-b", "lotr-b-as-lora")
    >>> report.modules, report.ranks, report.lora_params
    (4, {'q_proj': 8, 'v_proj': 8}, 2048)
    """
    source_dir = lotr if isinstance(lotr, (str, os.PathLike)) else None
    check_output(out_dir, force, inputs=[source_dir])
    files = _adapter_files(lotr, adapter)
    source = str(lotr) if isinstance(lotr, (str, os.PathLike)) else type(lotr).__name__
    source += f" (adapter {adapter})" if adapter else ""
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
            b, a = (u @ core, v.T) if r_in <= r_out else (u, core @ v.T)
            key_a, key_b = lora_keys(module)
            # the factors are shared by the group's modules; PEFT stores one copy per module
            tensors[key_a], tensors[key_b] = a.clone().contiguous(), b.clone().contiguous()
            rank_of_module[module] = min(r_out, r_in)
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
        ranks={name: min(g.rank) for name, g in files.groups.items()},
        lora_params=sum(t.numel() for k, t in tensors.items() if ".lora_" in k),
        modules_to_save=modules_to_save,
    )


def _adapter_files(lotr: str | os.PathLike | Any, adapter: str | None) -> LoTRAdapterFiles:
    """The adapter to export: a LoTR folder, one adapter of a zoo folder, or a model's adapter."""
    if not isinstance(lotr, (str, os.PathLike)):
        return lotr.adapter_files() if adapter is None else lotr.adapter_files(adapter)
    if is_zoo_dir(lotr):
        zoo = read_zoo(lotr)
        if adapter is None:
            raise ValueError(f"{lotr} is a zoo of {len(zoo.adapters)} adapters; choose one with --adapter NAME")
        return zoo.adapter(adapter)
    if adapter is not None:
        raise ValueError(f"{lotr} is a single LoTR adapter, not a zoo; drop --adapter")
    return read_adapter(lotr)


@dataclass(kw_only=True)
class InspectReport(Result):
    """What :func:`inspect_adapter` found: per group layers, shape, rank ``[r_out, r_in]``, params, dtype.

    A LoRA group's rank is ``[r, r]`` with ``r`` its largest module rank.

    Examples
    --------
    >>> info = inspect_adapter("my-lora")
    >>> info.format, info.params
    ('peft-lora', 1024)
    >>> [(g["group"], g["layers"], g["shape"], g["rank"]) for g in info.groups]
    [('q_proj', 2, [32, 32], [4, 4]), ('v_proj', 2, [32, 32], [4, 4])]
    """

    format: str
    path: str
    groups: list[dict[str, Any]]
    modules_to_save: list[str] = field(default_factory=list)
    modules_to_save_params: int = 0

    @property
    def params(self) -> int:
        return sum(g["params"] for g in self.groups)

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "totals": {"params": self.params}}

    def text(self) -> str:
        lines = [
            f"{self.path}: {self.format} adapter",
            format_table(self.groups),
            f"total adapter params: {self.params:,}",
        ]
        if self.modules_to_save:
            lines.append(f"modules_to_save: {', '.join(self.modules_to_save)} ({self.modules_to_save_params:,} params)")
        return "\n".join(lines)


def inspect_adapter(path: str | os.PathLike) -> Result:
    """Groups, shapes, ranks, parameters and dtype of a LoTR or PEFT LoRA folder; per adapter, for a zoo.

    Examples
    --------
    >>> print(inspect_adapter("my-lora"))
    my-lora: peft-lora adapter
    group   layers  shape  rank  params  dtype
    ------  ------  -----  ----  ------  -------
    q_proj       2  32x32  4x4      512  float32
    v_proj       2  32x32  4x4      512  float32
    total adapter params: 1,024
    """
    folder = Path(path)
    if is_zoo_dir(folder):
        from .zoo import inspect_zoo

        return inspect_zoo(folder)
    if is_lotr_dir(folder):
        files = read_adapter(folder)
        groups = [
            {
                "group": name,
                "layers": len(g.modules),
                "shape": list(g.shape),
                "rank": list(g.rank),
                "params": g.n_params,
                "dtype": str(files.factor(name, "out_factor").dtype).removeprefix("torch."),
            }
            for name, g in files.groups.items()
        ]
        add_report_columns(groups, folder, "groups", "group")
        saved = files.modules_to_save
        return InspectReport(
            format="lotr",
            path=str(folder),
            groups=groups,
            modules_to_save=sorted({k.rsplit(".", 1)[0] for k in saved}),
            modules_to_save_params=sum(t.numel() for t in saved.values()),
        )
    if (folder / PEFT_CONFIG_NAME).is_file():
        lora = PeftLoRA(folder)
        plan = group_modules({m.name: m.shape for m in lora.modules.values()}, "by_name")
        groups = []
        for group in plan:
            rank = max(lora.modules[n].rank for n in group.modules)
            groups.append(
                {
                    "group": group.name,
                    "layers": len(group.modules),
                    "shape": list(group.shape),
                    "rank": [rank, rank],
                    "params": sum(lora.modules[n].n_params for n in group.modules),
                    "dtype": lora.dtype,
                }
            )
        return InspectReport(
            format="peft-lora",
            path=str(folder),
            groups=groups,
            modules_to_save=sorted({k.rsplit(".", 1)[0] for k in lora.modules_to_save}),
            modules_to_save_params=lora.modules_to_save_params,
        )
    raise FileNotFoundError(f"{folder} holds neither lotr_config.json nor {PEFT_CONFIG_NAME}")
