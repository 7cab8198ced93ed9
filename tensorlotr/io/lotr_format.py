"""The LoTR adapter folder: ``lotr_config.json`` and ``lotr_model.safetensors``.

The safetensors file holds the adapter's tensors under the keys that
:mod:`tensorlotr.adapter.layout` defines (factors once per group, a core per module,
``modules_to_save`` tensors).

``lotr_config.json`` holds the user's ``config`` and the resolved ``groups``: for each group
its modules in stack order, ``shape`` [d_out, d_in], ``rank`` [r_out, r_in] and ``scale``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..adapter.config import CONFIG_NAME, FORMAT_VERSION
from ..adapter.layout import LoTRAdapterFiles
from ..files.atomic import atomic_file
from ..files.jsonfile import read_json_object
from .checkpoint import check_readable
from .peft_lotr import check_group_layouts, check_tensors, is_peft_lotr_dir, read_peft_lotr

WEIGHTS_NAME = "lotr_model.safetensors"
#: Dtypes whose range a converted adapter may overflow.
HALF_DTYPES = (torch.float16, torch.bfloat16)


def write_adapter(out_dir: str | os.PathLike[str], adapter: LoTRAdapterFiles) -> Path:
    """Write ``adapter``'s two files into ``out_dir``, creating it if needed.

    Each file is written to a temporary name and renamed into place, the weights before
    the config, so a reader never sees a half-written file. Other files in the folder
    (a Trainer checkpoint's, say) are left alone, as PEFT's ``save_pretrained`` does. For
    a whole new folder that must not replace an existing one, wrap this in
    :func:`tensorlotr.io.atomic_dir`. A group whose scale is NaN or Inf is refused, and so is
    a tensor holding NaN or Inf values (a float16 overflow, say), naming its key.

    Returns the folder. The weights file holds each group's ``U`` (d_out, r_out) and ``V``
    (d_in, r_in) once, and a (r_out, r_in) core per module.

    Examples
    --------
    A group of two (6, 5) layers at rank (3, 2), built from a Tucker-2 of the stack:

    >>> from pathlib import Path
    >>> import numpy as np
    >>> from tensorlotr.adapter import AdapterBuilder
    >>> from tensorlotr.core import tucker2
    >>> tucker = tucker2(np.random.default_rng(0).standard_normal((2, 6, 5)), rank=(3, 2))  # (L, d_out, d_in)
    >>> builder = AdapterBuilder()
    >>> builder.add_group("query", ["layer.0.query", "layer.1.query"], tucker, fan_in_fan_out=False)
    >>> print(write_adapter("my-adapter", builder.build(["query"], "by_name", [], {})))
    my-adapter
    >>> sorted(p.name for p in Path("my-adapter").iterdir())
    ['lotr_config.json', 'lotr_model.safetensors']
    """
    for name, group in adapter.groups.items():
        if not math.isfinite(group.scale):
            raise ValueError(f"group {name!r} has scale {group.scale}; refusing to write a non-finite scale")
    for key, tensor in adapter.tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            dtype = str(tensor.dtype).removeprefix("torch.")
            raise ValueError(
                f"tensor {key!r} ({dtype}) holds NaN or Inf values; refusing to write the adapter"
                + (" (its values overflow this dtype: keep a wider one)" if tensor.dtype in HALF_DTYPES else "")
            )
    document = {
        "format": "tensorlotr",
        "format_version": FORMAT_VERSION,
        "config": adapter.config,
        "groups": {name: g.to_dict() for name, g in adapter.groups.items()},
        "base_model": adapter.base_model,
    }
    metadata = {"format": "pt", "tensorlotr": str(FORMAT_VERSION)}
    return write_pair(out_dir, WEIGHTS_NAME, adapter.tensors, metadata, CONFIG_NAME, document)


def write_pair(
    out_dir: str | os.PathLike[str],
    weights_name: str,
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str],
    config_name: str,
    document: dict[str, Any],
) -> Path:
    """Write a safetensors file and its JSON document into ``out_dir``, the weights first.

    Each file goes to a temporary name and is renamed into place, so a reader that finds the
    document finds complete weights. Returns the folder.

    Examples
    --------
    >>> from pathlib import Path
    >>> import torch
    >>> tensors, metadata = {"x": torch.zeros(2, 3)}, {"format": "pt"}
    >>> print(write_pair("pair", "weights.safetensors", tensors, metadata, "doc.json", {"shape": [2, 3]}))
    pair
    >>> sorted(p.name for p in Path("pair").iterdir())
    ['doc.json', 'weights.safetensors']
    """
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_file(folder / weights_name, force=True) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    with atomic_file(folder / config_name, force=True) as tmp:
        tmp.write_text(json.dumps(document, indent=2) + "\n")
    return folder


def is_lotr_dir(path: str | os.PathLike[str]) -> bool:
    """True for a folder holding ``lotr_config.json`` (an adapter, or a config-only folder) or a LoTR adapter in
    PEFT's format (``adapter_config.json`` with ``peft_type`` LOTR, :mod:`tensorlotr.io.peft_lotr`).

    Examples
    --------
    >>> from tensorlotr import LoTRConfig
    >>> print(LoTRConfig(rank=8).save_pretrained("config-only"))
    config-only/lotr_config.json
    >>> is_lotr_dir("config-only"), is_lotr_dir(".")
    (True, False)
    """
    return (Path(path) / CONFIG_NAME).is_file() or is_peft_lotr_dir(path)


def read_adapter(path: str | os.PathLike[str]) -> LoTRAdapterFiles:
    """Read and check an adapter folder (either format); errors name the file and what is wrong.

    Every tensor is checked against its group's layout: ``U`` (d_out, r_out), ``V``
    (d_in, r_in) and each core (r_out, r_in), floating point and finite.

    Examples
    --------
    >>> import numpy as np
    >>> from tensorlotr.adapter import AdapterBuilder
    >>> from tensorlotr.core import tucker2
    >>> tucker = tucker2(np.random.default_rng(0).standard_normal((2, 6, 5)), rank=(3, 2))  # (L, d_out, d_in)
    >>> builder = AdapterBuilder()
    >>> builder.add_group("query", ["layer.0.query", "layer.1.query"], tucker, fan_in_fan_out=False)
    >>> _ = write_adapter("my-adapter", builder.build(["query"], "by_name", [], {}))
    >>> adapter = read_adapter("my-adapter")
    >>> adapter.groups["query"].shape, adapter.groups["query"].rank
    ((6, 5), (3, 2))
    >>> {key: tuple(tensor.shape) for key, tensor in adapter.tensors.items()}
    {'cores.layer.0.query': (3, 2), 'cores.layer.1.query': (3, 2),
     'factors.query.in_factor': (5, 2), 'factors.query.out_factor': (6, 3)}
    >>> read_adapter(".")
    Traceback (most recent call last):
    FileNotFoundError: lotr_config.json is missing; is . a LoTR adapter folder?
    """
    folder = Path(path)
    config_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder")
    if not config_path.is_file() and is_peft_lotr_dir(folder):  # the format LoTRModel.save_pretrained writes
        return read_peft_lotr(folder).adapter_files()
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} is missing; is {folder} a LoTR adapter folder?")
    if not weights_path.is_file():
        raise FileNotFoundError(f"{weights_path} is missing")
    document = read_json_object(config_path)
    version = document.get("format_version", 0)
    if document.get("format") != "tensorlotr" or not _is_int(version) or version > FORMAT_VERSION:
        raise ValueError(f"{config_path} is not a tensorlotr adapter of format version <= {FORMAT_VERSION}")
    groups = check_group_layouts(document.get("groups"), config_path, "'groups'")
    for key in ("config", "base_model"):
        if not isinstance(document.get(key, {}), dict):
            raise ValueError(f"{config_path}: {key!r} must be an object, got {document[key]!r}")
    if "config" not in document:
        raise ValueError(f"{config_path} has no 'config'")
    check_readable(weights_path)
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{weights_path} cannot be read as safetensors: {exc}") from None
    adapter = LoTRAdapterFiles(document["config"], groups, tensors, document.get("base_model", {}))
    check_tensors(adapter, weights_path)
    return adapter


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
