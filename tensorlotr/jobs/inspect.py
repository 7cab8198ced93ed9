"""``inspect_adapter``: the groups, shapes, ranks, parameters and dtype of an adapter folder."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..adapter import group_modules
from ..io import is_lotr_dir, read_adapter
from ..io.peft_lora import CONFIG_NAME as PEFT_CONFIG_NAME
from ..io.peft_lora import PeftLoRA
from ..io.zoo_format import is_zoo_dir
from ..report import Result, format_table
from .compression_report import add_report_columns, report_section
from .zoo import inspect_zoo


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
    retention: dict[str, Any] | None = None  # held-out retention, from the folder's compression report

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
        if self.retention is not None:
            r = self.retention
            text = f"held-out retention on {r.get('samples')} sequences: agreement {r.get('agreement', 0):.1%}"
            text += f", output retained {r.get('output_retention', 0):.1%}"
            if isinstance(r.get("retained_gain"), (int, float)):
                text += f", retained gain {r['retained_gain']:.1%}"
            lines.append(text)
        return "\n".join(lines)


def inspect_adapter(path: str | os.PathLike[str]) -> Result:
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
        retention = report_section(folder, "retention")
        return InspectReport(
            format="lotr",
            path=str(folder),
            groups=groups,
            modules_to_save=sorted({k.rsplit(".", 1)[0] for k in saved}),
            modules_to_save_params=sum(t.numel() for t in saved.values()),
            retention=retention if isinstance(retention, dict) else None,
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
