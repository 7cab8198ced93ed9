"""In-memory conversion of a live PEFT LoRA model to a trainable LoTR model (a LoRA warm-up).

PEFT is not imported: the model is read through the attributes its LoRA layers have
(``lora_A``, ``lora_B``, ``scaling``, ``base_layer``) and its ``peft_config``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..adapter import LoTRConfig
from ..adapter.groups import select_modules
from ..core import Tucker2, relative_error_lowrank, tucker2_lowrank

if TYPE_CHECKING:
    from .model import LoTRModel


@dataclass
class _LoRALayer:
    B: torch.Tensor  # (d_out, r)
    A: torch.Tensor  # (r, d_in)
    scale: float


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


def _lora_layers(model: nn.Module, adapter: str) -> dict[str, _LoRALayer]:
    """Each LoRA layer of ``adapter`` by module path: ``B`` (d_out, r), ``A`` (r, d_in), scale."""
    layers = {}
    for path, module in model.named_modules():
        lora_a, lora_b = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
        if not isinstance(lora_a, nn.ModuleDict) or adapter not in lora_a:
            continue
        a, b = lora_a[adapter].weight, lora_b[adapter].weight  # type: ignore[index]
        if a.dim() != 2 or b.dim() != 2:
            raise ValueError(f"{path}: LoRA of a {type(module.base_layer).__name__} is not a matrix LoRA")
        if getattr(module, "merged", False):
            raise ValueError(f"{path}: the LoRA is merged into the base weights; unmerge it first")
        layers[path] = _LoRALayer(b.detach().to(torch.float64), a.detach().to(torch.float64), module.scaling[adapter])
    if not layers:
        raise ValueError(f"the model has no LoRA layer of adapter {adapter!r}")
    return layers


def _target_pattern(paths: list[str]) -> str:
    """A regex matching exactly these module paths (LoTRConfig matches a str target in full)."""
    return "(" + "|".join(re.escape(p) for p in paths) + ")"


def _padded(tucker: Tucker2, rank: tuple[int, int], generator: torch.Generator) -> Tucker2:
    """``tucker`` at a larger ``rank``: orthonormal factor columns added, zero core entries."""
    core, factors = tucker.core, []
    for factor, r in ((tucker.out_factor, rank[0]), (tucker.in_factor, rank[1])):
        d, k = factor.shape
        if r > k:
            fill = torch.randn(d, r - k, dtype=factor.dtype, generator=generator)
            fill -= factor @ (factor.T @ fill)
            extra, _ = torch.linalg.qr(fill)
            factor = torch.cat([factor, extra], dim=1)
        factors.append(factor)
    padded = core.new_zeros(core.shape[0], rank[0], rank[1])
    padded[:, : core.shape[1], : core.shape[2]] = core
    return Tucker2(padded, factors[0], factors[1])


def _check_targets(model: nn.Module, config: LoTRConfig, layers: dict[str, _LoRALayer]) -> None:
    """Refuse, before the PEFT model is unloaded, a config that targets a module the LoRA does not adapt."""
    if config.target_modules is None or config.target_modules == "all-linear":
        return  # checked after the conversion, group by group
    inside = tuple(f"{path}." for path in layers)
    candidates = [n for n, _ in model.named_modules() if n and not n.startswith(inside)]
    chosen = select_modules(
        candidates, config.target_modules, exclude_modules=config.exclude_modules,
        layers_to_transform=config.layers_to_transform, layers_pattern=config.layers_pattern,
    )  # fmt: skip
    missing = [m for m in chosen if m not in layers]
    if missing:
        raise ValueError(f"the config targets {missing}, which the LoRA does not adapt; target the LoRA's modules only")


def lotr_from_peft_model(
    peft_model: nn.Module,
    config: LoTRConfig | None = None,
    *,
    rank: int | tuple[int, int] | None = None,
    is_trainable: bool = True,
) -> LoTRModel:
    """Convert a PEFT LoRA model to a LoTR model in memory; see :meth:`LoTRModel.from_peft_model`."""
    from .model import LoTRModel

    if config is not None and rank is not None:
        raise ValueError("give either config or rank, not both")
    adapter, lora_config = _lora_config(peft_model)
    base = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    layers = _lora_layers(base, adapter)
    if config is None:
        config = LoTRConfig(
            rank=rank if rank is not None else max(layer.A.shape[0] for layer in layers.values()),
            alpha=float(lora_config.lora_alpha),
            target_modules=_target_pattern(list(layers)),
            modules_to_save=list(lora_config.modules_to_save) if lora_config.modules_to_save else None,
        )
    _check_targets(base, config, layers)
    base = peft_model.unload()  # the LoRA layers go; the trained copies of modules_to_save stay
    lotr = LoTRModel(base, config)
    generator = torch.Generator().manual_seed(0)
    lotr.conversion_errors = {}
    for group, layout in lotr.groups.items():
        missing = [m for m in layout.modules if m not in layers]
        if missing:
            raise ValueError(f"group {group!r}: the LoRA does not adapt {missing}; target the LoRA's modules only")
        stack = [layers[m] for m in layout.modules]
        B, A, scales = [x.B for x in stack], [x.A for x in stack], [x.scale for x in stack]
        tucker = tucker2_lowrank(B, A, tuple(layout.rank), scale=scales)
        lotr.conversion_errors[group] = float(relative_error_lowrank(tucker, B, A, scale=scales))
        lotr.load_tucker(group, _padded(tucker, tuple(layout.rank), generator))
    lotr._trainable[lotr.active_adapter] = is_trainable
    lotr._mark_trainable()
    if not is_trainable:
        lotr.eval()
    return lotr
