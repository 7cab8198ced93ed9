"""The adapter's model card, ``README.md``: YAML front matter, then ranks, sizes and how to load it.

Saving again updates the front matter's keys and keeps the rest of a card the user has
edited, as PEFT's ``save_pretrained`` does. The loading snippet uses the ``transformers`` Auto
class of the adapter's task (or of the base model's class), names the base model only by its
Hub id (never a local path), and names the adapter by its Hub repo once it is pushed.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..adapter.layout import LoTRAdapterFiles
from ..files.atomic import atomic_file

CARD_NAME = "README.md"
#: What the snippet says where the adapter's folder or Hub repo goes, until a push names the repo.
ADAPTER_PLACEHOLDER = "PATH_OR_REPO_ID"
_FRONT = re.compile(r"\A---\n(.*?)\n---\n?", re.DOTALL)
_HUB_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")
#: PEFT's task types and the Auto class that loads a base model for each.
_TASK_AUTO_CLASSES = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoModel",
}
#: transformers' tables of model classes by Auto class, searched in this order for the base model's class.
_AUTO_TABLES = (
    ("AutoModelForCausalLM", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"),
    ("AutoModelForSeq2SeqLM", "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES"),
    ("AutoModelForSequenceClassification", "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES"),
    ("AutoModelForTokenClassification", "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES"),
    ("AutoModelForQuestionAnswering", "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES"),
    ("AutoModelForMaskedLM", "MODEL_FOR_MASKED_LM_MAPPING_NAMES"),
    ("AutoModel", "MODEL_MAPPING_NAMES"),
)


def hub_model_id(name_or_path: str | None) -> str | None:
    """``name_or_path`` if it names a model on the Hub (``org/name`` or ``name``), None for a local path or nothing.

    A base model loaded from a folder records the folder's path: that is no ``base_model`` for
    a card, which the Hub reads as a repo id.

    Examples
    --------
    >>> hub_model_id("meta-llama/Llama-3.2-1B"), hub_model_id("/home/me/models/llama"), hub_model_id("./llama")
    ('meta-llama/Llama-3.2-1B', None, None)
    """
    if not name_or_path or len(name_or_path) > 96 or not _HUB_ID.match(name_or_path):
        return None
    if ".." in name_or_path or "--" in name_or_path or os.path.exists(name_or_path):
        return None  # a relative path to a folder here, not a repo id
    return name_or_path


def auto_class(task_type: str | None, base_class: str | None) -> str:
    """The ``transformers`` Auto class that loads the base model: by PEFT ``task_type``, else by the base's class.

    Examples
    --------
    >>> auto_class("CAUSAL_LM", None), auto_class(None, "BertForSequenceClassification"), auto_class(None, "Mine")
    ('AutoModelForCausalLM', 'AutoModelForSequenceClassification', 'AutoModel')
    """
    if task_type in _TASK_AUTO_CLASSES:
        return _TASK_AUTO_CLASSES[task_type]
    if base_class:
        from transformers.models.auto import modeling_auto

        for auto, table in _AUTO_TABLES:
            for value in getattr(modeling_auto, table, {}).values():
                if base_class in ((value,) if isinstance(value, str) else tuple(value)):
                    return auto
    return "AutoModel"


def _front_matter(base_model: str | None) -> dict[str, object]:
    meta: dict[str, object] = {"library_name": "tensorlotr", "tags": ["tensorlotr", "lotr", "tucker-2", "adapter"]}
    base = hub_model_id(base_model)
    if base:
        meta["base_model"] = base
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


def card_body(adapter: LoTRAdapterFiles, adapter_name: str = "default", repo_id: str | None = None) -> str:
    """The card's text: a table of groups with ranks and sizes against LoRA, and loading code.

    Per group: the layers ``L``, the shape (d_out, d_in), the rank (r_out, r_in), LoTR's
    ``r_out*d_out + r_in*d_in + L*r_out*r_in`` parameters, and LoRA's ``L*r*(d_out + d_in)``
    at ``r = min(r_out, r_in)``. The loading code uses :func:`auto_class`, the base model's Hub
    id (``BASE_MODEL`` where it was loaded from a folder), and ``repo_id`` where the adapter is
    (:data:`ADAPTER_PLACEHOLDER` when not given); an adapter other than ``"default"`` is in the
    subfolder named after it.

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
    hub_base = hub_model_id(adapter.base_model.get("name_or_path"))
    base = hub_base or "BASE_MODEL"
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
    where = f'"{repo_id}"' if repo_id else ADAPTER_PLACEHOLDER
    if adapter_name != "default":
        where += (
            f', subfolder="{adapter_name}", adapter_name="{adapter_name}"'
            if repo_id
            else f', adapter_name="{adapter_name}"'
        )
    auto = auto_class(adapter.config.get("task_type"), adapter.base_model.get("class"))
    base_comment = "" if hub_base else "  # the base model's folder or Hub id"
    return "\n".join(
        [
            "# LoTR adapter",
            "",
            f"A low-tensor-rank (LoTR) adapter for `{hub_base or 'its base model'}`, made with "
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
            f"from transformers import {auto}",
            "",
            f'base = {auto}.from_pretrained("{base}"){base_comment}',
            f"model = tlr.LoTRModel.from_pretrained(base, {where})",
            f"# or with PEFT, after import tensorlotr: peft.PeftModel.from_pretrained(base, {where})",
            "```",
            "",
            "`tensorlotr export-lora PATH OUT` writes it as an exact PEFT LoRA for any LoRA runtime.",
            "",
        ]
    )


def write_model_card(
    folder: str | os.PathLike[str], adapter: LoTRAdapterFiles, adapter_name: str = "default", repo_id: str | None = None
) -> Path:
    """Write or update ``folder/README.md`` for ``adapter``; an edited body is kept.

    Returns the card's path. The front matter's keys (``library_name``, ``tags``,
    ``base_model``) are rewritten each time; other keys and the body stay as the user left them,
    except that ``repo_id`` (the Hub repo the adapter is pushed to) fills in :data:`ADAPTER_PLACEHOLDER`.

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
        if repo_id:
            subfolder = f', subfolder="{adapter_name}"' if adapter_name != "default" else ""
            body = body.replace(ADAPTER_PLACEHOLDER, f'"{repo_id}"{subfolder}')
    else:
        front, body = _yaml(meta), card_body(adapter, adapter_name, repo_id)
    with atomic_file(path, force=True) as tmp:
        tmp.write_text(f"---\n{front}\n---\n\n{body.lstrip(chr(10))}", encoding="utf-8")
    return path
