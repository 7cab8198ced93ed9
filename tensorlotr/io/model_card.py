"""The adapter's model card, ``README.md``: YAML front matter, then ranks, sizes and how to load it.

Saving again updates the front matter's keys and keeps the rest of a card the user has
edited, as PEFT's ``save_pretrained`` does.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..adapter.layout import LoTRAdapterFiles
from .atomic import atomic_file

CARD_NAME = "README.md"
_FRONT = re.compile(r"\A---\n(.*?)\n---\n?", re.DOTALL)


def _front_matter(base_model: str | None) -> dict[str, object]:
    meta: dict[str, object] = {"library_name": "tensorlotr", "tags": ["tensorlotr", "lotr", "tucker-2", "adapter"]}
    if base_model:
        meta["base_model"] = base_model
    return meta


def _yaml(meta: dict[str, object]) -> str:
    lines = []
    for key, value in meta.items():
        if isinstance(value, list):
            lines.append(f"{key}:")
            lines += [f"- {item}" for item in value]
        else:
            lines.append(f"{key}: {value}")
    return "\n".join(lines)


def _merge_front(existing: str, meta: dict[str, object]) -> str:
    """``existing`` front matter with ``meta``'s keys replaced or added; other keys kept as written."""
    blocks: dict[str, list[str]] = {}
    current = None
    for line in existing.splitlines():
        match = re.match(r"^([A-Za-z0-9_-]+):", line)
        if match:
            current = match.group(1)
            blocks[current] = [line]
        elif current is not None:
            blocks[current].append(line)
    for key, value in meta.items():
        blocks[key] = _yaml({key: value}).splitlines()
    return "\n".join(line for block in blocks.values() for line in block)


def card_body(adapter: LoTRAdapterFiles, adapter_name: str = "default") -> str:
    """The card's text: a table of groups with ranks and sizes against LoRA, and loading code."""
    base = adapter.base_model.get("name_or_path") or "BASE_MODEL"
    rows = []
    lotr_total = lora_total = 0
    for name, group in adapter.groups.items():
        (d_out, d_in), (r_out, r_in) = group.shape, group.rank
        lora = len(group.modules) * min(r_out, r_in) * (d_out + d_in)
        lotr_total += group.n_params
        lora_total += lora
        rows.append(
            f"| {name} | {len(group.modules)} | {d_out}x{d_in} | {r_out}x{r_in} | {group.n_params:,} | {lora:,} |"
        )
    load = "from_pretrained(base, PATH_OR_REPO_ID)"
    if adapter_name != "default":
        load = f'from_pretrained(base, PATH_OR_REPO_ID, adapter_name="{adapter_name}")'
    return "\n".join(
        [
            "# LoTR adapter",
            "",
            f"A low-tensor-rank (LoTR) adapter for `{base}`, made with "
            "[tensorlotr](https://github.com/tensorlotr/tensorlotr). Each group stacks one projection "
            "across layers as a Tucker-2 tensor, `dW_l = U G_l V^T`, with `U` and `V` shared by the layers.",
            "",
            "| group | layers | shape (d_out x d_in) | rank (r_out x r_in) | LoTR params | LoRA params, same rank |",
            "|---|---|---|---|---|---|",
            *rows,
            "",
            f"In total {lotr_total:,} adapter parameters, against {lora_total:,} for LoRA at the same rank "
            f"({lora_total / max(lotr_total, 1):.1f}x).",
            "",
            "## How to load it",
            "",
            "```python",
            "import tensorlotr as tlr",
            "from transformers import AutoModel  # the base model's class",
            "",
            f'base = AutoModel.from_pretrained("{base}")',
            f"model = tlr.LoTRModel.{load}",
            "```",
            "",
            "`tensorlotr export-lora PATH OUT` writes it as an exact PEFT LoRA for any LoRA runtime.",
            "",
        ]
    )


def write_model_card(folder: str | os.PathLike, adapter: LoTRAdapterFiles, adapter_name: str = "default") -> Path:
    """Write or update ``folder/README.md`` for ``adapter``; an edited body is kept."""
    path = Path(folder) / CARD_NAME
    meta = _front_matter(adapter.base_model.get("name_or_path"))
    if path.is_file():
        text = path.read_text(encoding="utf-8")
        found = _FRONT.match(text)
        front = _merge_front(found.group(1), meta) if found else _yaml(meta)
        body = text[found.end() :] if found else text
    else:
        front, body = _yaml(meta), card_body(adapter, adapter_name)
    with atomic_file(path, force=True) as tmp:
        tmp.write_text(f"---\n{front}\n---\n\n{body.lstrip(chr(10))}", encoding="utf-8")
    return path
