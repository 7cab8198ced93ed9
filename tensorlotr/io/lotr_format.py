"""The LoTR adapter folder: ``lotr_config.json`` and ``lotr_model.safetensors``.

The safetensors file holds the adapter's tensors under the keys that
:mod:`tensorlotr.adapter.layout` defines (factors once per group, a core per module,
``modules_to_save`` tensors).

``lotr_config.json`` holds the user's ``config`` and the resolved ``groups``: for each group
its modules in stack order, ``shape`` [d_out, d_in], ``rank`` [r_out, r_in] and ``scale``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..adapter.layout import GroupLayout, LoTRAdapterFiles, expected_shapes
from .atomic import atomic_file

CONFIG_NAME = "lotr_config.json"
WEIGHTS_NAME = "lotr_model.safetensors"
FORMAT_VERSION = 1


def write_adapter(out_dir: str | os.PathLike, adapter: LoTRAdapterFiles) -> Path:
    """Write ``adapter``'s two files into ``out_dir``, creating it if needed.

    Each file is written to a temporary name and renamed into place, the weights before
    the config, so a reader never sees a half-written file. Other files in the folder
    (a Trainer checkpoint's, say) are left alone, as PEFT's ``save_pretrained`` does. For
    a whole new folder that must not replace an existing one, wrap this in
    :func:`tensorlotr.io.atomic_dir`.
    """
    document = {
        "format": "tensorlotr",
        "format_version": FORMAT_VERSION,
        "config": adapter.config,
        "groups": {name: g.to_dict() for name, g in adapter.groups.items()},
        "base_model": adapter.base_model,
    }
    tensors = {k: v.detach().contiguous().cpu() for k, v in adapter.tensors.items()}
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_file(folder / WEIGHTS_NAME, force=True) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", "tensorlotr": str(FORMAT_VERSION)})
    with atomic_file(folder / CONFIG_NAME, force=True) as tmp:
        tmp.write_text(json.dumps(document, indent=2) + "\n")
    return folder


def is_lotr_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / CONFIG_NAME).is_file()


def read_adapter(path: str | os.PathLike) -> LoTRAdapterFiles:
    """Read and check an adapter folder; errors name the file and what is wrong."""
    folder = Path(path)
    config_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder")
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} is missing; is {folder} a LoTR adapter folder?")
    if not weights_path.is_file():
        raise FileNotFoundError(f"{weights_path} is missing")
    try:
        document = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{config_path} is not valid JSON: {exc}") from None
    if document.get("format") != "tensorlotr" or int(document.get("format_version", 0)) > FORMAT_VERSION:
        raise ValueError(f"{config_path} is not a tensorlotr adapter of format version <= {FORMAT_VERSION}")
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{weights_path} cannot be read as safetensors: {exc}") from None
    groups = {name: GroupLayout.from_dict(g) for name, g in document["groups"].items()}
    adapter = LoTRAdapterFiles(document["config"], groups, tensors, document.get("base_model", {}))
    _check_tensors(adapter, weights_path)
    return adapter


def _check_tensors(adapter: LoTRAdapterFiles, where: Path) -> None:
    for name, group in adapter.groups.items():
        for key, shape in expected_shapes(name, group).items():
            if key not in adapter.tensors:
                raise ValueError(f"{where} lacks tensor {key!r}")
            tensor = adapter.tensors[key]
            if tuple(tensor.shape) != shape:
                raise ValueError(f"{where}: tensor {key!r} has shape {tuple(tensor.shape)}, expected {shape}")
            if not torch.isfinite(tensor).all():
                raise ValueError(f"{where}: tensor {key!r} contains NaN or Inf values")
