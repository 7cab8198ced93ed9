"""The adapter's model card, ``README.md``: YAML front matter, then ranks, sizes and how to load it.

Saving again updates the front matter's keys and keeps the rest of a card the user has
edited, as PEFT's ``save_pretrained`` does.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..adapter.layout import LoTRAdapterFiles
from ..files.atomic import atomic_file

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
    """The card's text: a table of groups with ranks and sizes against LoRA, and loading code.

    Per group: the layers ``L``, the shape (d_out, d_in), the rank (r_out, r_in), LoTR's
    ``r_out*d_out + r_in*d_in + L*r_out*r_in`` parameters, and LoRA's ``L*r*(d_out + d_in)``
    at ``r = min(r_out, r_in)``.

    Examples
    --------
    Six (32, 32) query projections at rank 4: 4*32 + 4*32 + 6*4*4 = 352 parameters, against
    6*4*(32 + 32) = 1,536 for LoRA:

    >>> import numpy as np
    >>> from tensorlotr.adapter import AdapterBuilder
    >>> from tensorlotr.core import tucker2
    >>> tucker = tucker2(np.random.default_rng(0).standard_normal((6, 32, 32)), rank=4)  # (L, d_out, d_in)
    >>> builder = AdapterBuilder()
    >>> builder.add_group("query", [f"layer.{i}.query" for i in range(6)], tucker, fan_in_fan_out=False)
    >>> adapter = builder.build(["query"], "by_name", [], {"name_or_path": "my-base"})
    >>> print("\\n".join(card_body(adapter).splitlines()[4:7]))
    | group | layers | shape (d_out x d_in) | rank (r_out x r_in) | LoTR params | LoRA params, same rank |
    |---|---|---|---|---|---|
    | query | 6 | 32x32 | 4x4 | 352 | 1,536 |
    """
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


def write_model_card(folder: str | os.PathLike[str], adapter: LoTRAdapterFiles, adapter_name: str = "default") -> Path:
    """Write or update ``folder/README.md`` for ``adapter``; an edited body is kept.

    Returns the card's path. The front matter's keys (``library_name``, ``tags``,
    ``base_model``) are rewritten each time; other keys and the body stay as the user left them.

    Examples
    --------
    >>> import numpy as np
    >>> from tensorlotr.adapter import AdapterBuilder
    >>> from tensorlotr.core import tucker2
    >>> tucker = tucker2(np.random.default_rng(0).standard_normal((2, 6, 5)), rank=(3, 2))  # (L, d_out, d_in)
    >>> builder = AdapterBuilder()
    >>> builder.add_group("query", ["layer.0.query", "layer.1.query"], tucker, fan_in_fan_out=False)
    >>> adapter = builder.build(["query"], "by_name", [], {"name_or_path": "my-base"})
    >>> card = write_model_card("my-adapter", adapter)
    >>> print(card.read_text()[:120])
    ---
    library_name: tensorlotr
    tags:
    - tensorlotr
    - lotr
    - tucker-2
    - adapter
    base_model: my-base
    ---
    <BLANKLINE>
    # LoTR adapter
    ...
    >>> _ = card.write_text(card.read_text().replace("# LoTR adapter", "# My sentiment adapter"))
    >>> "# My sentiment adapter" in write_model_card("my-adapter", adapter).read_text()  # the edit is kept
    True
    """
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
