"""Building LoTR adapter files from Tucker-2 decompositions (shared by convert and decompose)."""

from __future__ import annotations

from typing import Any

import torch

from .core import Tucker2
from .layout import GroupLayout
from .nn.config import LoTRConfig


def store_group(
    tensors: dict[str, torch.Tensor],
    layouts: dict[str, GroupLayout],
    name: str,
    modules: list[str],
    tucker: Tucker2,
    *,
    fan_in_fan_out: bool,
) -> None:
    """Add a group's factors and cores to ``tensors`` at scale 1 (the cores absorb every scale)."""
    core = torch.as_tensor(tucker.core).to(torch.float32)
    tensors[f"factors.{name}.out_factor"] = torch.as_tensor(tucker.out_factor).to(torch.float32).contiguous()
    tensors[f"factors.{name}.in_factor"] = torch.as_tensor(tucker.in_factor).to(torch.float32).contiguous()
    for i, module in enumerate(modules):
        tensors[f"cores.{module}"] = core[i].clone()
    d_out, d_in = int(tucker.out_factor.shape[0]), int(tucker.in_factor.shape[0])
    layouts[name] = GroupLayout(modules, (d_out, d_in), tucker.rank, 1.0, fan_in_fan_out)


def adapter_config(
    layouts: dict[str, GroupLayout],
    target_modules: Any,
    groups: str | dict[str, list[str]],
    modules_to_save: list[str],
) -> LoTRConfig:
    """The config of a built adapter: per-group ranks, and alpha = min(rank) so every scale is 1."""
    ranks = {name: tuple(g.rank) for name, g in layouts.items()}
    first = next(iter(ranks.values()))
    return LoTRConfig(
        rank=first,
        alpha=float(min(first)),
        target_modules=target_modules if target_modules else sorted({m for g in layouts.values() for m in g.modules}),
        groups=groups,
        modules_to_save=modules_to_save or None,
        rank_pattern=dict(ranks),
        alpha_pattern={name: float(min(r)) for name, r in ranks.items()},
    )
