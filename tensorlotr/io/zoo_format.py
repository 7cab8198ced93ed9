"""The zoo folder: ``zoo_config.json`` and ``zoo_model.safetensors``.

The weights file holds each group's shared factors once and every adapter's cores, under
the keys of :mod:`tensorlotr.adapter.layout`. The config lists the groups (shape, rank)
and the adapters (source, modules by group, size and error at compression). A zoo is read as
strictly as a single adapter: an integer format version, every field of its type, the groups'
scale 1, every factor and core of its shape, floating point and finite.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import re
import secrets
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from ..adapter.layout import IN_FACTOR, OUT_FACTOR, ZooAdapter, ZooFiles, factor_key, zoo_core_key, zoo_residual_key
from ..files.jsonfile import read_json_object
from .lotr_format import _is_int, write_pair
from .peft_lotr import check_group_layouts

ZOO_CONFIG_NAME = "zoo_config.json"
ZOO_WEIGHTS_NAME = "zoo_model.safetensors"
#: The newest format: 2 adds per-adapter residuals; a zoo without them is written as version 1.
ZOO_FORMAT_VERSION = 2
#: What an adapter's name in a zoo may hold: it becomes part of the zoo's tensor keys.
ADAPTER_NAME = re.compile(r"[A-Za-z0-9_-]+")
#: Names no adapter may take: ``"__base__"`` stands for the base model in ``LoTRModel``'s mixed batches.
RESERVED_NAMES = frozenset({"__base__"})


def is_zoo_dir(path: str | os.PathLike[str]) -> bool:
    """True for a folder holding ``zoo_config.json``.

    Examples
    --------
    >>> from pathlib import Path
    >>> Path("my-zoo").mkdir()
    >>> is_zoo_dir("my-zoo")
    False
    >>> _ = Path("my-zoo/zoo_config.json").write_text("{}")
    >>> is_zoo_dir("my-zoo")
    True
    """
    return (Path(path) / ZOO_CONFIG_NAME).is_file()


def write_zoo(out_dir: str | os.PathLike[str], zoo: ZooFiles) -> Path:
    """Write ``zoo``'s two files into ``out_dir`` (weights first; each renamed into place).

    Returns the folder. The weights file holds each group's ``U`` (d_out, r_out) and ``V``
    (d_in, r_in) once, and per adapter a (r_out, r_in) core for each of its modules (with a
    residual of rank (s_out, s_in) in the group: its private factors and cores of
    (r_out + s_out, r_in + s_in)). A zoo with residuals is format version 2, so that an older
    tensorlotr refuses it by its version instead of misreading it.

    Examples
    --------
    Two adapters ``a`` and ``b`` of one group of two (6, 5) layers, sharing ``U`` (6, 3) and
    ``V`` (5, 2):

    >>> from pathlib import Path
    >>> import torch
    >>> from tensorlotr.adapter.layout import GroupLayout, ZooAdapter, ZooFiles, factor_key, zoo_core_key
    >>> layout = GroupLayout(["layer.0.query", "layer.1.query"], shape=(6, 5), rank=(3, 2), scale=1.0)
    >>> u, v = torch.randn(6, 3), torch.randn(5, 2)  # U (d_out, r_out), V (d_in, r_in)
    >>> tensors = {factor_key("query", "out_factor"): u, factor_key("query", "in_factor"): v}
    >>> tensors |= {zoo_core_key(a, m): torch.randn(3, 2) for a in ("a", "b") for m in layout.modules}
    >>> adapters = {a: ZooAdapter(f"lora-{a}", {"query": layout.modules}) for a in ("a", "b")}
    >>> print(write_zoo("my-zoo", ZooFiles({"query": layout}, adapters, tensors)))
    my-zoo
    >>> sorted(p.name for p in Path("my-zoo").iterdir())
    ['zoo_config.json', 'zoo_model.safetensors']
    """
    generation = secrets.token_hex(8)  # the same in both files: a reader knows they belong together
    version = ZOO_FORMAT_VERSION if any(a.residual for a in zoo.adapters.values()) else 1
    document = {
        "format": "tensorlotr-zoo",
        "format_version": version,
        "generation": generation,
        "groups": {name: g.to_dict() for name, g in zoo.groups.items()},
        "adapters": {name: a.to_dict() for name, a in zoo.adapters.items()},
        "base_model": zoo.base_model,
    }
    metadata = {"format": "pt", "tensorlotr-zoo": str(version), "generation": generation}
    return write_pair(out_dir, ZOO_WEIGHTS_NAME, zoo.tensors, metadata, ZOO_CONFIG_NAME, document)


def read_zoo(path: str | os.PathLike[str]) -> ZooFiles:
    """Read and check a zoo folder; errors name the file and what is wrong.

    The config and the weights are of one version of the zoo, even when ``zoo add`` replaces
    it meanwhile.

    Examples
    --------
    A zoo of two adapters of one group of two (6, 5) layers at rank (3, 2):

    >>> import torch
    >>> from tensorlotr.adapter.layout import GroupLayout, ZooAdapter, ZooFiles, factor_key, zoo_core_key
    >>> layout = GroupLayout(["layer.0.query", "layer.1.query"], shape=(6, 5), rank=(3, 2), scale=1.0)
    >>> u, v = torch.randn(6, 3), torch.randn(5, 2)  # U (d_out, r_out), V (d_in, r_in)
    >>> tensors = {factor_key("query", "out_factor"): u, factor_key("query", "in_factor"): v}
    >>> tensors |= {zoo_core_key(a, m): torch.randn(3, 2) for a in ("a", "b") for m in layout.modules}
    >>> adapters = {a: ZooAdapter(f"lora-{a}", {"query": layout.modules}) for a in ("a", "b")}
    >>> _ = write_zoo("two-adapters", ZooFiles({"query": layout}, adapters, tensors))
    >>> zoo = read_zoo("two-adapters")
    >>> sorted(zoo.adapters), zoo.n_params  # U and V once (18 + 10), four (3, 2) cores (24)
    (['a', 'b'], 52)
    >>> b = zoo.adapter("b")  # a plain LoTR adapter: the shared factors and b's cores
    >>> b.groups["query"].rank, tuple(b.core("layer.1.query").shape), tuple(b.factor("query", "out_factor").shape)
    ((3, 2), (3, 2), (6, 3))
    """
    folder = Path(path)
    for _ in range(5):  # a zoo replaced while it is read (by ``zoo add``): read the new one whole
        try:
            return _read_zoo(folder)
        except _ReplacedError:
            continue
    raise ValueError(f"{folder} was replaced 5 times while it was read; try again")


class _ReplacedError(Exception):
    """The zoo's two files were read from two versions of the zoo: it was replaced meanwhile."""


def _generation(config_path: Path) -> Any:
    """The ``generation`` that ``config_path`` holds now (None when it holds none or cannot be read)."""
    try:
        return read_json_object(config_path).get("generation")
    except (OSError, ValueError):
        return None


def _metadata(raw: bytes) -> dict[str, Any]:
    """The ``__metadata__`` of the safetensors bytes ``raw`` (its header: 8 bytes of length, then JSON)."""
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + size]) if 8 + size <= len(raw) else {}
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    return metadata if isinstance(metadata, dict) else {}


def _read_zoo(folder: Path) -> ZooFiles:
    """One read of the zoo in ``folder``, its config and its weights checked; ``_ReplacedError`` if it changed."""
    config_path, weights_path = folder / ZOO_CONFIG_NAME, folder / ZOO_WEIGHTS_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} is missing; is {folder} a LoTR zoo folder?")
    if not weights_path.is_file():
        raise FileNotFoundError(f"{weights_path} is missing")
    document = read_json_object(config_path)
    if document.get("format") != "tensorlotr-zoo":
        raise ValueError(f"{config_path} is not a tensorlotr zoo")
    version = document.get("format_version", 0)
    if not _is_int(version) or not 0 <= version <= ZOO_FORMAT_VERSION:
        raise ValueError(
            f"{config_path} has format version {version!r}; this reads integers up to {ZOO_FORMAT_VERSION}"
        )
    groups = check_group_layouts(document.get("groups"), config_path, "'groups'")
    for name, group in groups.items():
        if group.scale != 1.0:
            raise ValueError(
                f"{config_path}: group {name!r}: 'scale' must be 1 in a zoo (the cores carry the scale), "
                f"got {group.scale!r}"
            )
    adapters = _read_adapters(document.get("adapters"), config_path)
    base_model = document.get("base_model") or {}
    if not isinstance(base_model, dict):
        raise ValueError(f"{config_path}: 'base_model' must be an object, got {base_model!r}")
    generation = document.get("generation")
    try:  # one read of the file: its header and its data of one version (a second open could see another)
        raw = weights_path.read_bytes()
        stamp = _metadata(raw).get("generation")
        tensors = load_safetensors(raw)
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        if generation is not None and _generation(config_path) != generation:
            raise _ReplacedError from None
        raise ValueError(f"{weights_path} cannot be read as safetensors: {exc}") from None
    if generation is not None and stamp is not None and stamp != generation:
        if _generation(config_path) != generation:
            raise _ReplacedError
        raise ValueError(
            f"{weights_path} and {config_path} were written by different runs: they do not belong together"
        )
    zoo = ZooFiles(groups, adapters, tensors, base_model)
    _check(zoo, weights_path)
    return zoo


def _read_adapters(adapters: Any, where: Path) -> dict[str, ZooAdapter]:
    """The ``adapters`` of a ``zoo_config.json``, checked field by field; errors name the file and adapter."""
    if not isinstance(adapters, dict) or not adapters:
        raise ValueError(f"{where}: 'adapters' must be a non-empty object of adapters, got {adapters!r}")
    entries = {}
    for name, entry in adapters.items():
        if not ADAPTER_NAME.fullmatch(name) or name in RESERVED_NAMES:
            raise ValueError(f"{where}: adapter name {name!r} must be letters, digits, '_' or '-', and not '__base__'")
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: adapter {name!r} must be an object, got {entry!r}")
        source, groups = entry.get("source"), entry.get("groups")
        params, error = entry.get("lora_params", 0), entry.get("relative_error", 0.0)
        saved = entry.get("modules_to_save", [])
        if not isinstance(source, str):
            raise ValueError(f"{where}: adapter {name!r}: 'source' must be a string, got {source!r}")
        if not (isinstance(groups, dict) and all(_names(m) for m in groups.values())):
            raise ValueError(
                f"{where}: adapter {name!r}: 'groups' must map groups to lists of module names, got {groups!r}"
            )
        modules = [m for listed in groups.values() for m in listed]
        if len(set(modules)) != len(modules):
            raise ValueError(f"{where}: adapter {name!r} lists a module twice")
        if not (_is_int(params) and params >= 0):
            raise ValueError(f"{where}: adapter {name!r}: 'lora_params' must be a whole number, got {params!r}")
        if not (isinstance(error, numbers.Real) and not isinstance(error, bool) and math.isfinite(error)):
            raise ValueError(f"{where}: adapter {name!r}: 'relative_error' must be a finite number, got {error!r}")
        if not (isinstance(saved, list) and all(isinstance(m, str) for m in saved)):
            raise ValueError(f"{where}: adapter {name!r}: 'modules_to_save' must be a list of names, got {saved!r}")
        residual = entry.get("residual", {})
        if not (isinstance(residual, dict) and all(_is_rank(r) for r in residual.values())):
            raise ValueError(
                f"{where}: adapter {name!r}: 'residual' must map groups to ranks [s_out, s_in] >= 0, got {residual!r}"
            )
        entries[name] = ZooAdapter.from_dict(entry)
    return entries


def _is_rank(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and all(_is_int(r) and r >= 0 for r in value)


def _names(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(m, str) and m for m in value)


def _check(zoo: ZooFiles, where: Path) -> None:
    for name, group in zoo.groups.items():
        (d_out, d_in), (r_out, r_in) = group.shape, group.rank
        expected = {factor_key(name, OUT_FACTOR): (d_out, r_out), factor_key(name, IN_FACTOR): (d_in, r_in)}
        for adapter, entry in zoo.adapters.items():
            s_out, s_in = entry.residual.get(name, (0, 0))
            if name in entry.residual:
                expected[zoo_residual_key(adapter, name, OUT_FACTOR)] = (d_out, s_out)
                expected[zoo_residual_key(adapter, name, IN_FACTOR)] = (d_in, s_in)
            for module in entry.groups.get(name, []):
                if module not in group.modules:
                    raise ValueError(f"{where}: adapter {adapter!r} lists {module!r}, which group {name!r} lacks")
                expected[zoo_core_key(adapter, module)] = (r_out + s_out, r_in + s_in)
        for key, shape in expected.items():
            tensor = zoo.tensors.get(key)
            if tensor is None:
                raise ValueError(f"{where} lacks tensor {key!r}")
            if tuple(tensor.shape) != shape or not tensor.is_floating_point():
                raise ValueError(f"{where}: tensor {key!r} is {tuple(tensor.shape)} {tensor.dtype}, expected {shape}")
            if not torch.isfinite(tensor).all():
                raise ValueError(f"{where}: tensor {key!r} contains NaN or Inf values")
    for adapter, entry in zoo.adapters.items():
        unknown = set(entry.groups) - set(zoo.groups)
        if unknown:
            raise ValueError(f"{where}: adapter {adapter!r} names groups the zoo lacks: {sorted(unknown)}")
        unknown = set(entry.residual) - set(entry.groups)
        if unknown:
            raise ValueError(f"{where}: adapter {adapter!r} has a residual in groups it lacks: {sorted(unknown)}")
