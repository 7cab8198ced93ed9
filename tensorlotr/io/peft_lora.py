"""PEFT LoRA folders: ``adapter_config.json`` with ``adapter_model.safetensors`` (or ``.bin``).

The reader indexes the tensors without loading them, checks the structure, and loads the
factors of a few modules at a time, so converting a 7B checkpoint never holds all of it.
Only safetensors and ``torch.load(weights_only=True)`` are used: nothing that is not plain
tensors is unpickled.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..adapter.groups import module_order
from .atomic import atomic_file

CONFIG_NAME = "adapter_config.json"
SAFE_WEIGHTS_NAME = "adapter_model.safetensors"
BIN_WEIGHTS_NAME = "adapter_model.bin"
PREFIX = "base_model.model."
_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32"}


def pattern_key(patterns: Iterable[str], module: str) -> str | None:
    """The key of PEFT's ``rank_pattern`` / ``alpha_pattern`` that matches ``module``, if any."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def _strip_prefix(key: str) -> str:
    return key[len(PREFIX) :] if key.startswith(PREFIX) else key


def lora_keys(module: str) -> tuple[str, str]:
    """PEFT's keys of ``lora_A`` (r, d_in) and ``lora_B`` (d_out, r) for the module at path ``module``."""
    return f"{PREFIX}{module}.lora_A.weight", f"{PREFIX}{module}.lora_B.weight"


def saved_tensor_key(parameter: str) -> str:
    """PEFT's key of a ``modules_to_save`` tensor, by parameter path in the base model."""
    return f"{PREFIX}{parameter}"


@dataclass(frozen=True)
class LoRAModule:
    """One adapted module: ``dW = scale * B @ A`` with ``A`` (r, d_in) and ``B`` (d_out, r)."""

    name: str
    d_out: int
    d_in: int
    rank: int
    scale: float
    key_a: str
    key_b: str

    @property
    def shape(self) -> tuple[int, int]:
        return self.d_out, self.d_in

    @property
    def n_params(self) -> int:
        return self.rank * (self.d_in + self.d_out)


class _Tensors:
    """Lazy access to the tensors of a safetensors file, or a weights-only ``.bin``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._loaded: dict[str, torch.Tensor] | None = None
        if path.suffix == ".safetensors":
            try:
                with safe_open(str(path), framework="pt") as handle:
                    self.shapes = {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}  # noqa: SIM118
                    self.dtypes = {k: _DTYPES.get(handle.get_slice(k).get_dtype(), "?") for k in handle.keys()}  # noqa: SIM118
            except (SafetensorError, OSError) as exc:
                raise ValueError(f"{path} cannot be read as safetensors (truncated or corrupt?): {exc}") from None
        else:
            try:
                loaded = torch.load(str(path), map_location="cpu", weights_only=True)
            except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError, TypeError) as exc:
                raise ValueError(
                    f"{path} is not a plain dict of tensors; refusing to unpickle it (weights_only=True): {exc}"
                ) from None
            if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
                raise ValueError(f"{path} does not hold a dict of tensors")
            self._loaded = loaded
            self.shapes = {k: tuple(v.shape) for k, v in loaded.items()}
            self.dtypes = {k: str(v.dtype).removeprefix("torch.") for k, v in loaded.items()}

    def get(self, keys: list[str]) -> list[torch.Tensor]:
        if self._loaded is not None:
            return [self._loaded[k] for k in keys]
        try:
            with safe_open(str(self.path), framework="pt") as handle:
                return [handle.get_tensor(k) for k in keys]
        except (SafetensorError, OSError) as exc:
            raise ValueError(f"{self.path}: cannot read tensors {keys[:2]}…: {exc}") from None


class PeftLoRA:
    """A PEFT LoRA checkpoint folder, indexed and checked, tensors loaded on demand.

    Attributes
    ----------
    config : dict
        ``adapter_config.json``.
    modules : dict of str to LoRAModule
        Adapted modules by path in the base model, in layer order.
    modules_to_save : list of str
        Keys (parameter paths in the base model) of the full tensors saved alongside.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"{self.path} is not a folder")
        config_path = self.path / CONFIG_NAME
        if not config_path.is_file():
            raise FileNotFoundError(f"{config_path} is missing; is {self.path} a PEFT adapter folder?")
        try:
            self.config: dict[str, Any] = json.loads(config_path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{config_path} is not valid JSON: {exc}") from None
        if self.config.get("peft_type", "LORA") != "LORA":
            raise ValueError(f"{config_path}: peft_type is {self.config.get('peft_type')!r}, not 'LORA'")
        weights = self.path / SAFE_WEIGHTS_NAME
        if not weights.is_file():
            weights = self.path / BIN_WEIGHTS_NAME
        if not weights.is_file():
            raise FileNotFoundError(f"{self.path} has neither {SAFE_WEIGHTS_NAME} nor {BIN_WEIGHTS_NAME}")
        self.weights_path = weights
        self._tensors = _Tensors(weights)
        self.modules, self.modules_to_save = self._index()

    # --- structure -----------------------------------------------------------------
    def _index(self) -> tuple[dict[str, LoRAModule], list[str]]:
        shapes = self._tensors.shapes
        where = self.weights_path
        unsupported: dict[str, list[str]] = {}
        pairs: dict[str, dict[str, str]] = {}
        extra: list[str] = []
        for key in shapes:
            bare = _strip_prefix(key)
            if "lora_embedding_" in bare:
                unsupported.setdefault("embedding LoRA", []).append(bare.split(".lora_embedding_")[0])
                continue
            found = re.match(r"(.+)\.(lora_[A-Za-z_]+)\.(?:[^.]+\.)?(weight|bias)$", bare)
            if found is None:
                if "lora_" in bare:
                    unsupported.setdefault("unknown LoRA tensor", []).append(bare)
                else:
                    extra.append(bare)
                continue
            module, kind, what = found.groups()
            if kind in {"lora_A", "lora_B"} and what == "weight":
                pairs.setdefault(module, {})[kind] = key
            elif kind in {"lora_A", "lora_B"} and what == "bias":
                unsupported.setdefault("lora_bias (a bias on lora_B)", []).append(module)
            elif kind.startswith("lora_embedding"):
                unsupported.setdefault("embedding LoRA", []).append(module)
            elif kind.startswith("lora_magnitude"):
                unsupported.setdefault("DoRA (use_dora)", []).append(module)
            else:
                unsupported.setdefault(f"LoRA tensor {kind}", []).append(module)
        if self.config.get("use_dora"):
            unsupported.setdefault("DoRA (use_dora)", list(pairs) or ["(all)"])
        if self.config.get("lora_bias"):
            unsupported.setdefault("lora_bias", list(pairs) or ["(all)"])
        for module, keys in pairs.items():
            if "lora_A" in keys and len(shapes[keys["lora_A"]]) != 2:
                unsupported.setdefault("convolution LoRA", []).append(module)
        if unsupported:
            detail = "; ".join(f"{kind}: {sorted(set(mods))[:6]}" for kind, mods in unsupported.items())
            raise ValueError(f"{where}: LoTR cannot represent this adapter ({detail})")
        if not pairs:
            raise ValueError(f"{where} holds no LoRA tensors (lora_A / lora_B)")

        rank_pattern: dict[str, int] = self.config.get("rank_pattern") or {}
        alpha_pattern: dict[str, float] = self.config.get("alpha_pattern") or {}
        default_r = self.config.get("r")
        default_alpha = self.config.get("lora_alpha", default_r)
        rslora = bool(self.config.get("use_rslora", False))
        modules = {}
        for module in sorted(pairs, key=module_order):
            keys = pairs[module]
            missing = {"lora_A", "lora_B"} - set(keys)
            if missing:
                raise ValueError(f"{where}: module {module!r} lacks {sorted(missing)[0]}.weight")
            (r_a, d_in), (d_out, r_b) = shapes[keys["lora_A"]], shapes[keys["lora_B"]]
            if r_a != r_b:
                raise ValueError(
                    f"{where}: module {module!r} has lora_A {shapes[keys['lora_A']]} and lora_B "
                    f"{shapes[keys['lora_B']]}, whose ranks differ"
                )
            key = pattern_key(rank_pattern, module)
            expected_r = rank_pattern[key] if key is not None else default_r
            if expected_r is not None and int(expected_r) != r_a:
                raise ValueError(f"{where}: module {module!r} has rank {r_a} but {CONFIG_NAME} says r={expected_r}")
            key = pattern_key(alpha_pattern, module)
            alpha = float(alpha_pattern[key] if key is not None else (default_alpha or r_a))
            scale = alpha / math.sqrt(r_a) if rslora else alpha / r_a
            modules[module] = LoRAModule(module, d_out, d_in, r_a, scale, keys["lora_A"], keys["lora_B"])
        return modules, extra

    @property
    def fan_in_fan_out(self) -> bool:
        return bool(self.config.get("fan_in_fan_out", False))

    @property
    def dtype(self) -> str:
        dtypes = {self._tensors.dtypes[m.key_a] for m in self.modules.values()}
        return ",".join(sorted(dtypes))

    @property
    def n_params(self) -> int:
        return sum(m.n_params for m in self.modules.values())

    @property
    def modules_to_save_params(self) -> int:
        """Elements of the full tensors saved alongside."""
        keys = [k for k in self._tensors.shapes if _strip_prefix(k) in self.modules_to_save]
        return sum(math.prod(self._tensors.shapes[k]) for k in keys)

    # --- tensors -------------------------------------------------------------------
    def load(self, names: list[str]) -> tuple[list[torch.Tensor], list[torch.Tensor], list[float]]:
        """``(B_l, A_l, scale_l)`` for ``names``; B (d_out, r), A (r, d_in). Checks for NaN and Inf."""
        keys = [k for n in names for k in (self.modules[n].key_b, self.modules[n].key_a)]
        tensors = self._tensors.get(keys)
        bs, as_ = tensors[0::2], tensors[1::2]
        for name, b, a in zip(names, bs, as_, strict=True):
            if not (torch.isfinite(b).all() and torch.isfinite(a).all()):
                raise ValueError(f"{self.weights_path}: module {name!r} has NaN or Inf values")
        return bs, as_, [self.modules[n].scale for n in names]

    def load_modules_to_save(self) -> dict[str, torch.Tensor]:
        """The full tensors saved alongside, by parameter path in the base model."""
        keys = [k for k in self._tensors.shapes if _strip_prefix(k) in self.modules_to_save]
        tensors = self._tensors.get(keys)
        return {_strip_prefix(k): t for k, t in zip(keys, tensors, strict=True)}


def lora_config(
    rank_of_module: dict[str, int],
    fan_in_fan_out: bool,
    modules_to_save: list[str],
    task_type: str | None,
    base_model: str | None,
) -> dict[str, Any]:
    """An ``adapter_config.json`` for an exported LoRA with scale 1 everywhere (``lora_alpha = r``).

    The most common rank is ``r``; modules of other ranks get ``rank_pattern`` and
    ``alpha_pattern`` entries keyed by their full path.
    """
    ranks = list(rank_of_module.values())
    default_rank = max(sorted(set(ranks)), key=ranks.count)
    others = {m: r for m, r in rank_of_module.items() if r != default_rank}
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model,
        "r": default_rank,
        "lora_alpha": default_rank,
        "rank_pattern": others,
        "alpha_pattern": dict(others),
        "target_modules": sorted(rank_of_module),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": fan_in_fan_out,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": modules_to_save or None,
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
    }


def write_peft_lora(out_dir: str | os.PathLike, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Path:
    """Write a PEFT LoRA folder: ``adapter_config.json`` and ``adapter_model.safetensors``.

    ``tensors`` are keyed as PEFT saves them (``base_model.model.<module>.lora_A.weight`` …).
    Each file is written to a temporary name and renamed into place.
    """
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_file(folder / SAFE_WEIGHTS_NAME, force=True) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
    with atomic_file(folder / CONFIG_NAME, force=True) as tmp:
        tmp.write_text(json.dumps(config, indent=2) + "\n")
    return folder
