"""Model weights read one tensor at a time: Hugging Face folders, modules or state dicts.

A folder may hold ``model.safetensors``, sharded safetensors with
``model.safetensors.index.json``, or ``pytorch_model.bin`` (or its shards with
``pytorch_model.bin.index.json``; read with
``torch.load(weights_only=True)``, never unpickling anything but tensors; memory-mapped when
it is in the zip format torch has written since 1.6, loaded whole in the legacy format).
The shards an index names must lie inside the folder: a name like ``../../etc/passwd`` is
refused before anything is opened.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ..adapter.groups import CONV1D_MODEL_TYPES, is_conv1d
from ..files.jsonfile import read_json_object

SAFE_NAME = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_NAME = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"


def unreadable(path: str | os.PathLike[str]) -> str | None:
    """Why the file ``path`` cannot be opened for reading (``"Permission denied"``), or None.

    safetensors reports every failure to open a file as "No such file or directory"; the
    readers ask the system first, so that their errors give the real reason.

    Examples
    --------
    >>> from pathlib import Path
    >>> _ = Path("weights.bin").write_bytes(b"x")
    >>> unreadable("weights.bin") is None
    True
    >>> unreadable("missing.bin")
    'No such file or directory'
    """
    try:
        with open(path, "rb"):
            return None
    except OSError as exc:
        return exc.strerror or str(exc)


def check_readable(path: str | os.PathLike[str]) -> None:
    """Raise unless the file ``path`` can be opened for reading; the error names ``path`` and the reason.

    A file the user may not read raises :class:`PermissionError` (the command line's exit code
    1, as for every permission problem); any other reason (a missing file, a folder) raises
    :class:`ValueError` (bad input, exit code 2).

    Examples
    --------
    >>> check_readable("missing.bin")
    Traceback (most recent call last):
    ...
    ValueError: missing.bin cannot be read: No such file or directory
    """
    try:
        with open(path, "rb"):
            return
    except PermissionError as exc:
        raise PermissionError(f"{path} cannot be read: {exc.strerror or exc}") from None
    except OSError as exc:
        raise ValueError(f"{path} cannot be read: {exc.strerror or exc}") from None


def load_tensor_file(path: Path, what: str) -> dict[str, torch.Tensor]:
    """The tensors of a ``torch.save`` file, unpickling nothing but tensors; errors name ``path``.

    Memory-mapped when the file has the zip format (torch >= 1.6), read whole in the legacy
    format (which cannot be mapped). ``what`` says what the file should be, for errors.

    Examples
    --------
    >>> import torch
    >>> torch.save({"w": torch.ones(2)}, "legacy.bin", _use_new_zipfile_serialization=False)
    >>> load_tensor_file(Path("legacy.bin"), "a state dict")
    {'w': tensor([1., 1.])}
    """
    check_readable(path)
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as exc:  # an untrusted file: whatever the unpickler raises, refuse it
        raise ValueError(f"{path} is not a plain dict of tensors; refusing to unpickle it: {exc}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold {what} (a dict of tensors)")
    return state


class WeightSource:
    """Read-only access to a model's tensors by state-dict key, one at a time.

    Attributes
    ----------
    name : str
        Where the weights come from, for messages.
    shapes : dict of str to tuple
        Every tensor's shape, read without loading the data.
    config : dict
        ``config.json`` of a folder (empty otherwise).
    conv1d_modules : set of str
        Module paths known to be GPT-2 ``Conv1D`` (weights stored (d_in, d_out)).
    """

    def __init__(self, name: str, shapes: dict[str, tuple[int, ...]], config: dict[str, Any] | None = None) -> None:
        self.name = name
        self.shapes = shapes
        self.config = config or {}
        self.conv1d_modules: set[str] = set()

    def get(self, key: str) -> torch.Tensor:
        """The tensor ``key``; it may share memory with the source, so do not modify it."""
        raise NotImplementedError

    def __contains__(self, key: str) -> bool:
        return key in self.shapes


class _StateDict(WeightSource):
    def __init__(self, name: str, state: dict[str, torch.Tensor], config: dict[str, Any] | None = None) -> None:
        super().__init__(name, {k: tuple(v.shape) for k, v in state.items()}, config)
        self._state = state

    def get(self, key: str) -> torch.Tensor:
        return self._state[key].detach()


class _Safetensors(WeightSource):
    def __init__(self, name: str, files: dict[str, Path], config: dict[str, Any]) -> None:
        shapes: dict[str, tuple[int, ...]] = {}
        self._file_of: dict[str, Path] = {}
        for path in sorted(set(files.values())):
            check_readable(path)
            try:
                with safe_open(str(path), framework="pt") as handle:
                    for key in handle.keys():  # noqa: SIM118 - safe_open handles are not mappings
                        shapes[key] = tuple(handle.get_slice(key).get_shape())
                        self._file_of[key] = path
            except (SafetensorError, OSError) as exc:
                raise ValueError(f"{path} cannot be read as safetensors (truncated or corrupt?): {exc}") from None
        missing = sorted(k for k in files if k != "*" and k not in self._file_of)
        if missing:
            raise ValueError(f"{name}: the index lists tensors its shards lack, e.g. {missing[:3]}")
        super().__init__(name, shapes, config)

    def get(self, key: str) -> torch.Tensor:
        # a handle per read: a long-lived one would keep every page it ever mapped resident
        try:
            with safe_open(str(self._file_of[key]), framework="pt") as handle:
                tensor: torch.Tensor = handle.get_tensor(key)
                return tensor
        except (SafetensorError, OSError) as exc:
            raise ValueError(f"{self._file_of[key]}: cannot read {key!r}: {exc}") from None


def open_weights(source: str | os.PathLike[str] | nn.Module | dict[str, torch.Tensor], role: str) -> WeightSource:
    """A :class:`WeightSource` for a model folder, an ``nn.Module`` or a state dict.

    ``role`` ("base", "fine-tuned") names the source in error messages.
    """
    if isinstance(source, nn.Module):
        source_module = source
        module_state = source_module.state_dict()
        model_config: dict[str, Any] = getattr(getattr(source_module, "config", None), "to_dict", dict)()
        module_weights = _StateDict(f"{role} model ({type(source_module).__name__})", module_state, model_config)
        module_weights.conv1d_modules = {n for n, m in source_module.named_modules() if is_conv1d(m)}
        return module_weights
    if isinstance(source, dict):
        bad = [k for k, v in source.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise ValueError(f"{role} state dict holds non-tensors, e.g. {bad[:3]}")
        return _StateDict(f"{role} state dict", source)
    folder = Path(source)
    if not folder.is_dir():
        raise FileNotFoundError(f"{role} model folder {folder} does not exist")
    config_path = folder / "config.json"
    config = read_json_object(config_path) if config_path.exists() else {}
    weights: WeightSource
    if (folder / SAFE_INDEX).is_file():
        files = {key: folder / shard for key, shard in _weight_map(folder / SAFE_INDEX).items()}
        absent = sorted({str(p) for p in files.values() if not p.is_file()})
        if absent:
            raise FileNotFoundError(f"{role} model: shards listed in {SAFE_INDEX} are missing: {absent[:3]}")
        weights = _Safetensors(str(folder), files, config)
    elif (folder / SAFE_NAME).is_file():
        weights = _Safetensors(str(folder), {"*": folder / SAFE_NAME}, config)
    elif (folder / BIN_NAME).is_file():
        weights = _StateDict(str(folder), load_tensor_file(folder / BIN_NAME, "a state dict"), config)
    elif (folder / BIN_INDEX).is_file():  # sharded .bin files, as transformers saved them before safetensors
        weight_map = _weight_map(folder / BIN_INDEX)
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            if not (folder / shard).is_file():
                raise FileNotFoundError(f"{role} model: shard {shard} listed in {BIN_INDEX} is missing")
            state.update(load_tensor_file(folder / shard, "a state dict shard"))
        lacking = sorted(k for k in weight_map if k not in state)
        if lacking:
            raise ValueError(f"{folder}: {BIN_INDEX} lists tensors its shards lack, e.g. {lacking[:3]}")
        weights = _StateDict(str(folder), state, config)
    else:
        raise FileNotFoundError(
            f"{role} model folder {folder} holds no {SAFE_NAME}, {SAFE_INDEX}, {BIN_NAME} or {BIN_INDEX}"
        )
    if config.get("model_type") in CONV1D_MODEL_TYPES:
        weights.conv1d_modules = {k.rsplit(".", 1)[0] for k, shape in weights.shapes.items() if len(shape) == 2}
    return weights


def open_weight_file(path: str | os.PathLike[str], role: str) -> WeightSource:
    """A :class:`WeightSource` for one weights file: ``.safetensors``, or a ``torch.save`` state dict.

    ``role`` names the source in error messages; a folder goes to :func:`open_weights`.

    Examples
    --------
    >>> import torch
    >>> torch.save({"layer.weight": torch.zeros(3, 2)}, "state.pt")
    >>> weights = open_weight_file("state.pt", "checkpoint")
    >>> weights.shapes, weights.name
    ({'layer.weight': (3, 2)}, 'state.pt')
    """
    file = Path(path)
    if file.is_dir():
        return open_weights(file, role)
    if not file.is_file():
        raise FileNotFoundError(f"{role} {file} does not exist")
    if file.suffix == ".safetensors":
        return _Safetensors(str(file), {"*": file}, {})
    return _StateDict(str(file), load_tensor_file(file, "a state dict"))


def _weight_map(index: Path) -> dict[str, str]:
    """The ``weight_map`` of a safetensors index: tensor key to shard file, each inside the folder."""
    weight_map = read_json_object(index).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"{index} is not a safetensors index: it has no 'weight_map' of tensor keys to file names")
    for shard in sorted(set(weight_map.values())):
        name = PurePosixPath(shard)
        if name.is_absolute() or ".." in name.parts:
            raise ValueError(
                f"{index}: shard {shard!r} lies outside the model folder {index.parent}; refusing to read it"
            )
    return weight_map
