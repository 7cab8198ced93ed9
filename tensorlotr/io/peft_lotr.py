"""A LoTR adapter as a PEFT-method folder: ``adapter_config.json`` (``peft_type`` LOTR), ``adapter_model.safetensors``.

This is the one folder that ``LoTRModel.save_pretrained`` writes and that both
``LoTRModel.from_pretrained`` and ``peft.PeftModel.from_pretrained`` (after ``import
tensorlotr``) load; ``PeftModel.save_pretrained`` of a LoTR PEFT model writes it too. This module
owns its names, as strings (:mod:`tensorlotr.peft` imports them), and maps its tensors to and from
:class:`~tensorlotr.adapter.layout.LoTRAdapterFiles`:

- ``base_model.lotr_factors.<group>.out_factor`` (d_out, r_out) and ``….in_factor`` (d_in, r_in):
  the group's ``U`` and ``V``, once per group (the factors live on PEFT's tuner);
- ``base_model.model.<module path>.lotr_cores`` (r_out, r_in): the core of each adapted module;
- ``base_model.model.<parameter path>``: the tensors of ``modules_to_save``, as PEFT saves them.

``adapter_config.json`` holds the fields of :class:`~tensorlotr.LoTRConfig`, PEFT's own fields
and ``lotr_layout``: the groups exactly as they were built (modules in stack order, shape, rank,
scale), the base model's description and the config keys this version does not know. A folder
that ``PeftModel.save_pretrained`` wrote from a config has no ``lotr_layout``: the loader then
rebuilds the groups on the model, from the modules the file holds cores for, as PEFT built them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..adapter.config import CONFIG_NAME as LOTR_CONFIG_NAME
from ..adapter.config import FORMAT_VERSION, LoTRConfig
from ..adapter.layout import (
    IN_FACTOR,
    OUT_FACTOR,
    GroupLayout,
    LoTRAdapterFiles,
    core_key,
    expected_shapes,
    factor_key,
    saved_key,
    saved_parameters,
)
from ..files.atomic import atomic_file
from ..files.jsonfile import read_json_object

__all__ = [
    "CONFIG_NAME",
    "CORES",
    "FACTORS",
    "LAYOUT",
    "PEFT_TYPE",
    "WEIGHTS_NAME",
    "PeftLoTRFolder",
    "is_peft_lotr_dir",
    "layout_groups",
    "peft_core_key",
    "peft_factor_key",
    "peft_saved_key",
    "peft_tensors",
    "read_peft_lotr",
    "write_peft_lotr",
]

#: PEFT's adapter config file and weights file.
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
#: The ``peft_type`` of a LoTR adapter.
PEFT_TYPE = "LOTR"
#: The tuner attribute of the factors, the layer attribute of the cores, the config field of the groups.
FACTORS = "lotr_factors"
CORES = "lotr_cores"
LAYOUT = "lotr_layout"
#: The earlier format's weights file (beside ``lotr_config.json``), removed when a folder is saved in this one.
LOTR_WEIGHTS_NAME = "lotr_model.safetensors"
#: Where PEFT's state dict puts the tuner's own tensors, and the model's.
_TUNER, _MODEL = "base_model.", "base_model.model."
#: PEFT's fields of the config besides LoTRConfig's (``task_type`` and ``inference_mode`` are LoTRConfig's too).
PEFT_FIELDS = ("peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision")
#: LoTRPeftConfig's own fields beyond LoTRConfig's and PEFT's.
PEFT_LOTR_FIELDS = ("trainable_token_indices", LAYOUT)


def peft_factor_key(group: str, which: str) -> str:
    """The key of a group's ``U`` (``"out_factor"``, (d_out, r_out)) or ``V`` (``"in_factor"``, (d_in, r_in)).

    Examples
    --------
    >>> peft_factor_key("q_proj", "out_factor")
    'base_model.lotr_factors.q_proj.out_factor'
    """
    if which not in (OUT_FACTOR, IN_FACTOR):
        raise ValueError(f"which must be {OUT_FACTOR!r} or {IN_FACTOR!r}, got {which!r}")
    return f"{_TUNER}{FACTORS}.{group}.{which}"


def peft_core_key(module: str) -> str:
    """The key of the core ``G_l`` (r_out, r_in) of the module at path ``module``.

    Examples
    --------
    >>> peft_core_key("model.layers.0.self_attn.q_proj")
    'base_model.model.model.layers.0.self_attn.q_proj.lotr_cores'
    """
    return f"{_MODEL}{module}.{CORES}"


def peft_saved_key(parameter: str) -> str:
    """The key of a ``modules_to_save`` tensor, by its parameter path in the base model, as PEFT saves it.

    Examples
    --------
    >>> peft_saved_key("classifier.weight")
    'base_model.model.classifier.weight'
    """
    return f"{_MODEL}{parameter}"


def peft_tensors(files: LoTRAdapterFiles) -> dict[str, torch.Tensor]:
    """The tensors of ``files`` under the keys of ``adapter_model.safetensors``.

    Examples
    --------
    One group of two (6, 5) layers at rank (3, 2), from a Tucker-2 of the stack:

    >>> import numpy as np
    >>> from tensorlotr.adapter import AdapterBuilder
    >>> from tensorlotr.core import tucker2
    >>> builder = AdapterBuilder()
    >>> tucker = tucker2(np.random.default_rng(0).standard_normal((2, 6, 5)), rank=(3, 2))  # (L, d_out, d_in)
    >>> builder.add_group("query", ["layer.0.query", "layer.1.query"], tucker, fan_in_fan_out=False)
    >>> sorted(peft_tensors(builder.build(["query"], "by_name", [], {})))
    ['base_model.lotr_factors.query.in_factor', 'base_model.lotr_factors.query.out_factor',
     'base_model.model.layer.0.query.lotr_cores', 'base_model.model.layer.1.query.lotr_cores']
    """
    out: dict[str, torch.Tensor] = {}
    for name, group in files.groups.items():
        for which in (OUT_FACTOR, IN_FACTOR):
            out[peft_factor_key(name, which)] = files.tensors[factor_key(name, which)]
        for module in group.modules:
            out[peft_core_key(module)] = files.tensors[core_key(module)]
    for parameter, tensor in saved_parameters(files.tensors).items():
        out[peft_saved_key(parameter)] = tensor
    return out


def _lotr_fields() -> set[str]:
    return {f.name for f in dataclasses.fields(LoTRConfig)} - {"extra"}


def write_peft_lotr(
    out_dir: str | os.PathLike[str], adapter: LoTRAdapterFiles, *, base_model_name_or_path: str | None = None
) -> Path:
    """Write ``adapter`` into ``out_dir`` as ``adapter_config.json`` and ``adapter_model.safetensors``.

    Each file goes to a temporary name and is renamed into place, the weights first, so a reader
    that finds the config finds complete weights. Other files in the folder are left alone, as
    PEFT's ``save_pretrained`` does, except the two files of tensorlotr's earlier format
    (``lotr_config.json``, ``lotr_model.safetensors``), which would otherwise stand for a stale
    adapter. ``inference_mode`` is written true, as PEFT writes it. A non-finite scale is refused.

    Returns the folder.

    Examples
    --------
    A group of two (6, 5) layers at rank (3, 2), from a Tucker-2 of the stack:

    >>> import json
    >>> import numpy as np
    >>> from tensorlotr.adapter import AdapterBuilder
    >>> from tensorlotr.core import tucker2
    >>> builder = AdapterBuilder()
    >>> tucker = tucker2(np.random.default_rng(0).standard_normal((2, 6, 5)), rank=(3, 2))  # (L, d_out, d_in)
    >>> builder.add_group("query", ["layer.0.query", "layer.1.query"], tucker, fan_in_fan_out=False)
    >>> print(write_peft_lotr("peft-folder", builder.build(["query"], "by_name", [], {})))
    peft-folder
    >>> config = json.load(open("peft-folder/adapter_config.json"))
    >>> config["peft_type"], config["rank"], config["lotr_layout"]["groups"]["query"]["modules"]
    ('LOTR', [3, 2], ['layer.0.query', 'layer.1.query'])
    """
    for name, group in adapter.groups.items():
        if not math.isfinite(group.scale):
            raise ValueError(f"group {name!r} has scale {group.scale}; refusing to write a non-finite scale")
    known = _lotr_fields()
    config = {k: v for k, v in adapter.config.items() if k in known}
    extra = {k: v for k, v in adapter.config.items() if k not in known}
    layout: dict[str, Any] = {
        "format": "tensorlotr",
        "format_version": FORMAT_VERSION,
        "groups": {name: g.to_dict() for name, g in adapter.groups.items()},
        "base_model": adapter.base_model,
    }
    if extra:
        layout["config_extra"] = extra
    document = {
        **config,
        "peft_type": PEFT_TYPE,
        "auto_mapping": None,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "trainable_token_indices": None,
        LAYOUT: layout,
    }
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in peft_tensors(adapter).items()}
    with atomic_file(folder / WEIGHTS_NAME, force=True) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", "tensorlotr": str(FORMAT_VERSION)})
    with atomic_file(folder / CONFIG_NAME, force=True) as tmp:
        tmp.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
    for stale in (LOTR_CONFIG_NAME, LOTR_WEIGHTS_NAME):
        (folder / stale).unlink(missing_ok=True)
    return folder


def is_peft_lotr_dir(path: str | os.PathLike[str]) -> bool:
    """True for a folder whose ``adapter_config.json`` says ``"peft_type": "LOTR"``.

    Examples
    --------
    >>> import numpy as np
    >>> from tensorlotr.adapter import AdapterBuilder
    >>> from tensorlotr.core import tucker2
    >>> builder = AdapterBuilder()
    >>> tucker = tucker2(np.random.default_rng(0).standard_normal((2, 6, 5)), rank=(3, 2))  # (L, d_out, d_in)
    >>> builder.add_group("query", ["layer.0.query", "layer.1.query"], tucker, fan_in_fan_out=False)
    >>> _ = write_peft_lotr("peft-folder", builder.build(["query"], "by_name", [], {}))
    >>> is_peft_lotr_dir("peft-folder"), is_peft_lotr_dir(".")
    (True, False)
    """
    config = Path(path) / CONFIG_NAME
    if not config.is_file():
        return False
    try:
        return read_json_object(config).get("peft_type") == PEFT_TYPE
    except (OSError, ValueError):
        return False


@dataclass
class PeftLoTRFolder:
    """A LoTR adapter folder in PEFT's format, as read: its config, PEFT's fields, its layout and its tensors.

    ``config`` holds the :class:`~tensorlotr.LoTRConfig` fields (with the unknown keys a
    ``lotr_layout`` carries), ``peft`` PEFT's own fields, ``layout`` the ``lotr_layout`` (None
    for a folder PEFT wrote from a config) and ``tensors`` the weights under the file's keys.

    Examples
    --------
    >>> import numpy as np
    >>> from tensorlotr.adapter import AdapterBuilder
    >>> from tensorlotr.core import tucker2
    >>> builder = AdapterBuilder()
    >>> tucker = tucker2(np.random.default_rng(0).standard_normal((2, 6, 5)), rank=(3, 2))  # (L, d_out, d_in)
    >>> builder.add_group("query", ["layer.0.query", "layer.1.query"], tucker, fan_in_fan_out=False)
    >>> _ = write_peft_lotr("peft-folder", builder.build(["query"], "by_name", [], {}))
    >>> folder = read_peft_lotr("peft-folder")
    >>> folder.core_modules(), sorted(folder.groups())
    (['layer.0.query', 'layer.1.query'], ['query'])
    >>> sorted(folder.adapter_files().tensors)
    ['cores.layer.0.query', 'cores.layer.1.query', 'factors.query.in_factor', 'factors.query.out_factor']
    """

    path: Path
    config: dict[str, Any]
    peft: dict[str, Any]
    layout: dict[str, Any] | None
    tensors: dict[str, torch.Tensor] = field(repr=False)

    def groups(self) -> dict[str, GroupLayout] | None:
        """The groups of ``lotr_layout``, or None when the folder has none."""
        if self.layout is None:
            return None
        return layout_groups(self.layout, self.path / CONFIG_NAME)

    def core_modules(self) -> list[str]:
        """The modules the file holds a core for, in the file's order."""
        head, tail = _MODEL, f".{CORES}"
        return [k[len(head) : -len(tail)] for k in self.tensors if k.startswith(head) and k.endswith(tail)]

    def adapter_files(self, groups: dict[str, GroupLayout] | None = None) -> LoTRAdapterFiles:
        """The adapter as :class:`LoTRAdapterFiles` on ``groups`` (default: its ``lotr_layout``'s).

        Every tensor is checked against the groups (``U`` (d_out, r_out), ``V`` (d_in, r_in),
        each core (r_out, r_in)), floating point and finite; a key that is neither a factor of
        a group, a core of one of its modules, nor a tensor of a module under ``base_model.model.``
        is refused. Errors name the file.
        """
        where = self.path / WEIGHTS_NAME
        groups = groups if groups is not None else self.groups()
        if groups is None:
            raise ValueError(
                f"{self.path / CONFIG_NAME} has no {LAYOUT} (PEFT wrote it from a config): its groups are built on the "
                f"model; load it with LoTRModel.from_pretrained(model, {str(self.path)!r}), which builds them"
            )
        tensors: dict[str, torch.Tensor] = {}
        known: set[str] = set()
        for name, group in groups.items():
            for which in (OUT_FACTOR, IN_FACTOR):
                key = peft_factor_key(name, which)
                known.add(key)
                if key in self.tensors:
                    tensors[factor_key(name, which)] = self.tensors[key]
            for module in group.modules:
                key = peft_core_key(module)
                known.add(key)
                if key in self.tensors:
                    tensors[core_key(module)] = self.tensors[key]
        for key, tensor in self.tensors.items():
            if key in known:
                continue
            if not key.startswith(_MODEL) or key.endswith(f".{CORES}"):
                raise ValueError(f"{where}: tensor {key!r} belongs to no group of {self.path / CONFIG_NAME}")
            tensors[saved_key(key[len(_MODEL) :])] = tensor
        files = LoTRAdapterFiles(self.config, dict(groups), tensors, self.base_model())
        check_tensors(files, where)
        return files

    def base_model(self) -> dict[str, Any]:
        """The base model's description: ``lotr_layout``'s, else PEFT's ``base_model_name_or_path``."""
        if self.layout is not None and isinstance(self.layout.get("base_model"), dict):
            return dict(self.layout["base_model"])
        return {"name_or_path": self.peft.get("base_model_name_or_path")}


def read_peft_lotr(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> PeftLoTRFolder:
    """Read the LoTR adapter folder ``path`` in PEFT's format; the tensors are read onto ``device``.

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` for a config that is not a
    LoTR one or weights that are not safetensors; errors name the file.

    Examples
    --------
    >>> import numpy as np
    >>> from tensorlotr.adapter import AdapterBuilder
    >>> from tensorlotr.core import tucker2
    >>> builder = AdapterBuilder()
    >>> tucker = tucker2(np.random.default_rng(0).standard_normal((2, 6, 5)), rank=(3, 2))  # (L, d_out, d_in)
    >>> builder.add_group("query", ["layer.0.query", "layer.1.query"], tucker, fan_in_fan_out=False)
    >>> _ = write_peft_lotr("peft-folder", builder.build(["query"], "by_name", [], {}))
    >>> folder = read_peft_lotr("peft-folder")
    >>> folder.config["rank"], folder.peft["peft_type"], folder.groups()["query"].rank
    ([3, 2], 'LOTR', (3, 2))
    """
    folder = Path(path)
    config_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} is missing; is {folder} a PEFT adapter folder?")
    document = read_json_object(config_path)
    if document.get("peft_type") != PEFT_TYPE:
        raise ValueError(f"{config_path}: peft_type is {document.get('peft_type')!r}, not {PEFT_TYPE!r}")
    if not weights_path.is_file():
        raise FileNotFoundError(f"{weights_path} is missing")
    layout = document.get(LAYOUT)
    if layout is not None and not (isinstance(layout, dict) and layout.get("format") == "tensorlotr"):
        raise ValueError(f"{config_path}: {LAYOUT} must be an object written by tensorlotr, got {layout!r}")
    if layout is not None and not (
        _is_int(layout.get("format_version")) and layout["format_version"] <= FORMAT_VERSION
    ):
        raise ValueError(f"{config_path}: {LAYOUT} is not of format version <= {FORMAT_VERSION}")
    known = _lotr_fields()
    config = {k: v for k, v in document.items() if k in known}
    if layout is not None and isinstance(layout.get("config_extra"), dict):
        config = {**layout["config_extra"], **config}
    skipped = set(PEFT_FIELDS) | set(PEFT_LOTR_FIELDS) | known
    config.update({k: v for k, v in document.items() if k not in skipped})  # newer fields: LoTRConfig keeps them
    peft = {k: document.get(k) for k in (*PEFT_FIELDS, "trainable_token_indices")}
    try:
        tensors = load_file(str(weights_path), device=str(device))
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{weights_path} cannot be read as safetensors: {exc}") from None
    return PeftLoTRFolder(folder, config, peft, layout, tensors)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def layout_groups(layout: dict[str, Any], where: str | os.PathLike[str] = CONFIG_NAME) -> dict[str, GroupLayout]:
    """The groups of a ``lotr_layout``, checked field by field; errors name ``where`` and the group.

    Examples
    --------
    >>> group = {"modules": ["layer.0.query"], "shape": [6, 5], "rank": [3, 2], "scale": 1.0}
    >>> layout_groups({"format": "tensorlotr", "format_version": 1, "groups": {"query": group}})["query"].rank
    (3, 2)
    """
    return check_group_layouts(layout.get("groups"), where, f"{LAYOUT}.groups")


def check_group_layouts(groups: Any, where: str | os.PathLike[str], field: str) -> dict[str, GroupLayout]:
    """``groups`` (a JSON object of group layouts, the file's ``field``) checked field by field.

    Raises ``ValueError`` naming ``where``, the group and the field at fault; a module in two
    groups names both.
    """
    if not isinstance(groups, dict) or not groups:
        raise ValueError(f"{where}: {field} must be a non-empty object of group layouts, got {groups!r}")
    layouts: dict[str, GroupLayout] = {}
    owner: dict[str, str] = {}
    for name, group in groups.items():
        if not isinstance(group, dict):
            raise ValueError(f"{where}: group {name!r} must be an object, got {group!r}")
        modules, shape, rank, scale = (group.get(k) for k in ("modules", "shape", "rank", "scale"))
        if not (isinstance(modules, list) and modules and all(isinstance(m, str) and m for m in modules)):
            raise ValueError(f"{where}: group {name!r}: 'modules' must be a non-empty list of names, got {modules!r}")
        for key, pair in (("shape", shape), ("rank", rank)):
            if not (isinstance(pair, list) and len(pair) == 2 and all(_is_int(n) and n > 0 for n in pair)):
                raise ValueError(f"{where}: group {name!r}: {key!r} must be two positive integers, got {pair!r}")
        if not (isinstance(scale, numbers.Real) and not isinstance(scale, bool) and math.isfinite(scale)):
            raise ValueError(f"{where}: group {name!r}: 'scale' must be a finite number, got {scale!r}")
        if not isinstance(group.get("fan_in_fan_out", False), bool):
            raise ValueError(f"{where}: group {name!r}: 'fan_in_fan_out' must be true or false")
        for module in modules:
            if module in owner:
                raise ValueError(f"{where}: module {module!r} is in groups {owner[module]!r} and {name!r}")
            owner[module] = name
        layouts[name] = GroupLayout.from_dict(group)
    return layouts


def check_tensors(adapter: LoTRAdapterFiles, where: str | os.PathLike[str]) -> None:
    """The tensors of ``adapter``'s groups: present, of their shapes, floating point, finite; errors name ``where``."""
    for name, group in adapter.groups.items():
        for key, shape in expected_shapes(name, group).items():
            if key not in adapter.tensors:
                raise ValueError(f"{where} lacks tensor {key!r}")
            tensor = adapter.tensors[key]
            if tuple(tensor.shape) != shape:
                raise ValueError(f"{where}: tensor {key!r} has shape {tuple(tensor.shape)}, expected {shape}")
            if not tensor.is_floating_point():
                raise ValueError(f"{where}: tensor {key!r} has dtype {str(tensor.dtype).removeprefix('torch.')}")
            if not torch.isfinite(tensor).all():
                raise ValueError(f"{where}: tensor {key!r} contains NaN or Inf values")
