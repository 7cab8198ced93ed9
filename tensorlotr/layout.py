"""What a LoTR adapter is, independent of files and modules: its groups and tensors.

The torch bindings build and consume these; :mod:`tensorlotr.io.lotr_format` writes and
reads them as ``lotr_config.json`` and ``lotr_model.safetensors``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class GroupLayout:
    """One group as stored: modules in stack order, ``shape`` (d_out, d_in), ``rank`` (r_out, r_in),
    and the ``scale`` of its updates, ``dW_l = scale * U G_l V^T``."""

    modules: list[str]
    shape: tuple[int, int]
    rank: tuple[int, int]
    scale: float
    fan_in_fan_out: bool = False  # the modules store their weight (d_in, d_out), as GPT-2's Conv1D

    def to_dict(self) -> dict[str, Any]:
        return {
            "modules": self.modules,
            "shape": list(self.shape),
            "rank": list(self.rank),
            "scale": self.scale,
            "fan_in_fan_out": self.fan_in_fan_out,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GroupLayout:
        return cls(
            list(data["modules"]),
            tuple(data["shape"]),
            tuple(data["rank"]),
            float(data["scale"]),
            bool(data.get("fan_in_fan_out", False)),
        )


@dataclass
class LoTRAdapterFiles:
    """An adapter folder's contents in memory."""

    config: dict[str, Any]
    groups: dict[str, GroupLayout]
    tensors: dict[str, torch.Tensor]
    base_model: dict[str, Any] = field(default_factory=dict)

    def factor(self, group: str, which: str) -> torch.Tensor:
        return self.tensors[f"factors.{group}.{which}"]

    def core(self, module: str) -> torch.Tensor:
        return self.tensors[f"cores.{module}"]

    @property
    def modules_to_save(self) -> dict[str, torch.Tensor]:
        prefix = "modules_to_save."
        return {k[len(prefix) :]: v for k, v in self.tensors.items() if k.startswith(prefix)}
