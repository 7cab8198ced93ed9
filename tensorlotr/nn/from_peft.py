"""In-memory conversion of a live PEFT LoRA model to a trainable LoTR model (a LoRA warm-up).

PEFT is not imported: the model is read through the attributes its LoRA layers have
(``lora_A``, ``lora_B``, ``scaling``, ``base_layer``) and its ``peft_config``, into
:class:`tensorlotr.adapter.lora.LoRALayers`, which :func:`tensorlotr.adapter.lora.lora_to_lotr`
converts at the groups and ranks of the new ``LoTRModel``: by default the exact ranks
(:func:`exact_ranks`), so the converted model computes the LoRA's function.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..adapter import Group, LoTRConfig
from ..adapter.config import TASK_TYPES
from ..adapter.groups import TASK_MODULES_TO_SAVE, group_modules, select_modules
from ..adapter.lora import LoRAFactors, LoRALayers, lora_to_lotr
from ..core import max_rank
from .targets import saved_patterns

if TYPE_CHECKING:
    from .model import LoTRModel


def _lora_config(peft_model: nn.Module) -> tuple[str, Any]:
    configs = getattr(peft_model, "peft_config", None)
    if not isinstance(configs, dict) or not configs:
        raise TypeError(f"expected a peft.PeftModel with a LoRA adapter, got {type(peft_model).__name__}")
    name = getattr(peft_model, "active_adapter", None)
    name = name if isinstance(name, str) else next(iter(configs))
    config = configs[name]
    kind = str(getattr(config, "peft_type", ""))
    if not kind.endswith("LORA") or kind.endswith("ADALORA"):
        raise ValueError(f"adapter {name!r} is {kind or 'not a PEFT adapter'}, not a LoRA; only LoRA converts")
    if getattr(config, "use_dora", False):
        raise ValueError(f"adapter {name!r} uses DoRA, whose magnitude vector a Tucker-2 of B A cannot hold")
    return name, config


def _lora_layers(model: nn.Module, adapter: str) -> LoRALayers:
    """Each LoRA layer of ``adapter`` by module path: ``B`` (d_out, r), ``A`` (r, d_in), scale, in float64."""
    layers = {}
    for path, layer in model.named_modules():
        module: Any = layer  # a PEFT LoRA layer, read through its attributes
        lora_a = getattr(module, "lora_A", None)
        if not isinstance(lora_a, nn.ModuleDict) or adapter not in lora_a:
            continue
        a, b = module.lora_A[adapter].weight, module.lora_B[adapter].weight
        if a.dim() != 2 or b.dim() != 2:
            raise ValueError(f"{path}: LoRA of a {type(module.base_layer).__name__} is not a matrix LoRA")
        if getattr(module, "merged", False):
            raise ValueError(f"{path}: the LoRA is merged into the base weights; unmerge it first")
        layers[path] = LoRAFactors(b.detach().to(torch.float64), a.detach().to(torch.float64), module.scaling[adapter])
    if not layers:
        raise ValueError(f"the model has no LoRA layer of adapter {adapter!r}")
    return LoRALayers(layers)


def _target_pattern(paths: list[str]) -> str:
    """A regex matching exactly these module paths (LoTRConfig matches a str target in full)."""
    return "(" + "|".join(re.escape(p) for p in paths) + ")"


def exact_ranks(layers: LoRALayers) -> dict[str, tuple[int, int]]:
    """Per group (``"by_name"``), the rank at which the Tucker-2 of the LoRA's stack is exact, whatever its factors.

    The stack ``[s_l B_l A_l]`` of a group of ``L`` layers has rank at most ``sum_l r_l`` in both
    modes, and never more than :func:`tensorlotr.core.max_rank`.

    Examples
    --------
    Three layers of a rank-2 LoRA on (d_out, d_in) = (32, 24): rank (6, 6).

    >>> layers = LoRALayers({f"l.{i}.q": LoRAFactors(torch.zeros(32, 2), torch.zeros(2, 24)) for i in range(3)})
    >>> exact_ranks(layers)
    {'q': (6, 6)}
    """
    ranks = {}
    for group in group_modules({path: layer.shape for path, layer in layers.modules.items()}):
        total = sum(layers.modules[m].rank for m in group.modules)
        bound = max_rank(len(group.modules), group.shape)
        ranks[group.name] = (min(total, bound[0]), min(total, bound[1]))
    return ranks


def _default_config(lora_config: Any, layers: LoRALayers, rank: int | tuple[int, int] | None) -> LoTRConfig:
    """The LoTR config that carries the LoRA's targets, alpha, dropout, task and head over; exact unless ``rank``."""
    task = getattr(lora_config, "task_type", None)
    task = str(getattr(task, "value", task)) if task is not None else None
    task = task if task in TASK_TYPES else None
    heads = TASK_MODULES_TO_SAVE.get(task or "", ())
    saved = [m for m in lora_config.modules_to_save or [] if m not in heads]  # PEFT lists the task's head too
    rank_pattern: dict[str, int | tuple[int, int]] = {}
    if rank is None:
        ranks = exact_ranks(layers)
        first = next(iter(ranks.values()))
        if any(r != first for r in ranks.values()):
            rank_pattern = dict(ranks)  # keyed by every group's name, so no module regex applies
        rank = first
    return LoTRConfig(
        rank=rank,
        alpha=float(lora_config.lora_alpha),
        target_modules=_target_pattern(list(layers.modules)),
        dropout=float(getattr(lora_config, "lora_dropout", 0.0) or 0.0),
        modules_to_save=list(dict.fromkeys(saved)) or None,
        rank_pattern=rank_pattern,
        task_type=task,
    )


def _check_targets(model: nn.Module, config: LoTRConfig, layers: LoRALayers) -> None:
    """Refuse, before the PEFT model is unloaded, a config that targets a module the LoRA does not adapt."""
    if config.target_modules is None or config.target_modules == "all-linear":
        return  # checked after the conversion, group by group
    inside = tuple(f"{path}." for path in layers.modules)
    candidates = [n for n, _ in model.named_modules() if n and not n.startswith(inside)]
    chosen = select_modules(
        candidates, config.target_modules, exclude_modules=config.exclude_modules,
        layers_to_transform=config.layers_to_transform, layers_pattern=config.layers_pattern,
        modules_to_save=saved_patterns(config.modules_to_save, config.task_type),
    )  # fmt: skip
    missing = [m for m in chosen if m not in layers.modules]
    if missing:
        raise ValueError(f"the config targets {missing}, which the LoRA does not adapt; target the LoRA's modules only")


def lotr_from_peft_model(
    cls: type[LoTRModel],
    peft_model: nn.Module,
    config: LoTRConfig | None = None,
    *,
    rank: int | tuple[int, int] | None = None,
    is_trainable: bool = True,
) -> LoTRModel:
    """Convert a PEFT LoRA model to a ``cls`` (a :class:`LoTRModel`) in memory; see :meth:`LoTRModel.from_peft_model`.

    The LoRA layers are read, the PEFT model unloaded, ``cls`` attached with ``config``, and
    each of its groups set to the LoRA's Tucker-2 at the group's rank, padded above the exact
    rank (:func:`tensorlotr.adapter.lora.lora_to_lotr` with ``pad=True``). With neither
    ``config`` nor ``rank``, every group gets its :func:`exact_ranks`: the conversion is lossless.
    """
    if config is not None and rank is not None:
        raise ValueError("give either config or rank, not both")
    adapter, lora_config = _lora_config(peft_model)
    peft: Any = peft_model  # a peft.PeftModel, read through its methods
    base = peft.get_base_model() if hasattr(peft, "get_base_model") else peft
    layers = _lora_layers(base, adapter)
    if config is None:
        config = _default_config(lora_config, layers, rank)
    _check_targets(base, config, layers)
    base = peft.unload()  # the LoRA layers go; the trained copies of modules_to_save stay
    lotr = cls(base, config)
    plan = []
    for group, layout in lotr.groups.items():
        missing = [m for m in layout.modules if m not in layers.modules]
        if missing:
            raise ValueError(f"group {group!r}: the LoRA does not adapt {missing}; target the LoRA's modules only")
        plan.append(Group(group, tuple(layout.modules), (layout.shape[0], layout.shape[1])))
    ranks = {group: (layout.rank[0], layout.rank[1]) for group, layout in lotr.groups.items()}
    conversion = lora_to_lotr(layers, rank=ranks, groups=plan, pad=True)
    lotr.conversion_errors = {g.group: g.relative_error for g in conversion.groups}
    for row in conversion.groups:
        lotr.load_tucker(row.group, row.tucker)
    lotr._set_trainable(lotr.active_adapter, is_trainable)
    if not is_trainable:
        lotr.eval()
    return lotr
