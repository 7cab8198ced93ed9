"""The zoo folder: ``zoo_config.json`` and ``zoo_model.safetensors``.

The weights file holds each group's shared factors once and every adapter's cores, under
the keys of :mod:`tensorlotr.adapter.layout`. The config lists the groups (shape, rank)
and the adapters (source, modules by group, size and error at compression).
"""

from __future__ import annotations

import os
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file

from ..adapter.layout import IN_FACTOR, OUT_FACTOR, GroupLayout, ZooAdapter, ZooFiles, factor_key, zoo_core_key
from ..files.jsonfile import read_json_object
from .lotr_format import write_pair

ZOO_CONFIG_NAME = "zoo_config.json"
ZOO_WEIGHTS_NAME = "zoo_model.safetensors"
ZOO_FORMAT_VERSION = 1


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
    (d_in, r_in) once, and per adapter a (r_out, r_in) core for each of its modules.

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
    document = {
        "format": "tensorlotr-zoo",
        "format_version": ZOO_FORMAT_VERSION,
        "groups": {name: g.to_dict() for name, g in zoo.groups.items()},
        "adapters": {name: a.to_dict() for name, a in zoo.adapters.items()},
        "base_model": zoo.base_model,
    }
    metadata = {"format": "pt", "tensorlotr-zoo": str(ZOO_FORMAT_VERSION)}
    return write_pair(out_dir, ZOO_WEIGHTS_NAME, zoo.tensors, metadata, ZOO_CONFIG_NAME, document)


def read_zoo(path: str | os.PathLike[str]) -> ZooFiles:
    """Read and check a zoo folder; errors name the file and what is wrong.

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
    config_path, weights_path = folder / ZOO_CONFIG_NAME, folder / ZOO_WEIGHTS_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} is missing; is {folder} a LoTR zoo folder?")
    if not weights_path.is_file():
        raise FileNotFoundError(f"{weights_path} is missing")
    document = read_json_object(config_path)
    if document.get("format") != "tensorlotr-zoo":
        raise ValueError(f"{config_path} is not a tensorlotr zoo")
    version = document.get("format_version", 0)
    if not isinstance(version, int) or isinstance(version, bool) or version > ZOO_FORMAT_VERSION:
        raise ValueError(f"{config_path} has format version {version!r}; this reads {ZOO_FORMAT_VERSION}")
    try:
        groups = {name: GroupLayout.from_dict(g) for name, g in document["groups"].items()}
        adapters = {name: ZooAdapter.from_dict(a) for name, a in document["adapters"].items()}
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ValueError(f"{config_path}: malformed groups or adapters ({exc!r})") from None
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{weights_path} cannot be read as safetensors: {exc}") from None
    zoo = ZooFiles(groups, adapters, tensors, document.get("base_model") or {})
    _check(zoo, weights_path)
    return zoo


def _check(zoo: ZooFiles, where: Path) -> None:
    for name, group in zoo.groups.items():
        (d_out, d_in), (r_out, r_in) = group.shape, group.rank
        expected = {factor_key(name, OUT_FACTOR): (d_out, r_out), factor_key(name, IN_FACTOR): (d_in, r_in)}
        for adapter, entry in zoo.adapters.items():
            for module in entry.groups.get(name, []):
                if module not in group.modules:
                    raise ValueError(f"{where}: adapter {adapter!r} lists {module!r}, which group {name!r} lacks")
                expected[zoo_core_key(adapter, module)] = (r_out, r_in)
        for key, shape in expected.items():
            tensor = zoo.tensors.get(key)
            if tensor is None:
                raise ValueError(f"{where} lacks tensor {key!r}")
            if tuple(tensor.shape) != shape or not tensor.is_floating_point():
                raise ValueError(f"{where}: tensor {key!r} is {tuple(tensor.shape)} {tensor.dtype}, expected {shape}")
    for adapter, entry in zoo.adapters.items():
        unknown = set(entry.groups) - set(zoo.groups)
        if unknown:
            raise ValueError(f"{where}: adapter {adapter!r} names groups the zoo lacks: {sorted(unknown)}")
