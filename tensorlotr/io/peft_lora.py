"""PEFT LoRA folders: ``adapter_config.json`` with ``adapter_model.safetensors`` (or ``.bin``).

The reader indexes the tensors without loading them, checks the structure, and loads the
factors of a few modules at a time, so converting a 7B checkpoint never holds all of it.
Only safetensors and ``torch.load(weights_only=True)`` are used: nothing that is not plain
tensors is unpickled.

The config means what it means to PEFT: ``peft_type`` and ``target_modules`` are required,
a missing ``r`` or ``lora_alpha`` takes ``LoraConfig``'s default (8), ``lora_alpha: 0`` is a
scale of 0, and every LoRA module must match ``target_modules`` as PEFT matches it.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..adapter.groups import module_order
from ..files.atomic import atomic_file
from ..files.jsonfile import read_json_object
from .checkpoint import check_readable, load_tensor_file

CONFIG_NAME = "adapter_config.json"
SAFE_WEIGHTS_NAME = "adapter_model.safetensors"
BIN_WEIGHTS_NAME = "adapter_model.bin"
PREFIX = "base_model.model."
#: ``LoraConfig``'s defaults for a config that omits them.
DEFAULT_R = 8
DEFAULT_ALPHA = 8
#: The LoRA factor dtypes that are read; any other (integers, bool, float8) is refused.
FLOAT_DTYPES = ("float64", "float32", "float16", "bfloat16")
_SAFE_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2", "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
    "BOOL": "bool",
}  # fmt: skip


def pattern_key(patterns: Iterable[str], module: str) -> str | None:
    """The key of PEFT's ``rank_pattern`` / ``alpha_pattern`` that matches ``module``, if any."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def is_target(module: str, target_modules: str | list[str]) -> bool:
    """PEFT's rule: a string is a regex matched in full (``"all-linear"``: any module); a list
    holds module paths or name suffixes."""
    if isinstance(target_modules, str):
        return target_modules == "all-linear" or re.fullmatch(target_modules, module) is not None
    return module in target_modules or any(module.endswith("." + t) for t in target_modules)


def _is_saved(key: str, modules_to_save: list[str]) -> bool:
    """Whether the parameter ``key`` belongs to a module named in ``modules_to_save`` (by name suffix)."""
    return any(f".{module}." in f".{key}" for module in modules_to_save)


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


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class _Settings:
    """The fields of ``adapter_config.json`` that the reader uses, checked, with PEFT's defaults."""

    target_modules: str | list[str]
    r: int
    alpha: float
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    use_rslora: bool
    fan_in_fan_out: bool
    modules_to_save: list[str]

    @classmethod
    def read(cls, config: dict[str, Any], path: Path) -> _Settings:
        """Check ``config`` (read from ``path``); errors name the file, the field and the value."""
        if "peft_type" not in config:
            raise ValueError(f"{path} has no peft_type; is it a PEFT adapter config?")
        if config["peft_type"] != "LORA":
            raise ValueError(f"{path}: peft_type is {config['peft_type']!r}, not 'LORA'")
        targets = config.get("target_modules")
        if targets is None:
            raise ValueError(f"{path} has no target_modules; PEFT cannot tell which modules the LoRA adapts")
        if isinstance(targets, str):
            _check_regex(targets, f"{path}: target_modules")
        elif not (isinstance(targets, list) and targets and all(isinstance(t, str) and t for t in targets)):
            raise ValueError(f"{path}: target_modules must be a regex or a non-empty list of names, got {targets!r}")
        r = config.get("r", DEFAULT_R)
        if not _is_int(r) or r <= 0:
            raise ValueError(f"{path}: r must be a positive integer, got {r!r}")
        alpha = config.get("lora_alpha", DEFAULT_ALPHA)
        if not _is_finite_number(alpha):
            raise ValueError(f"{path}: lora_alpha must be a finite number, got {alpha!r}")
        patterns = {}
        for field_name, valid, wanted in (
            ("rank_pattern", lambda v: _is_int(v) and v > 0, "positive integers"),
            ("alpha_pattern", _is_finite_number, "finite numbers"),
        ):
            pattern = config.get(field_name) or {}
            if not isinstance(pattern, dict):
                raise ValueError(f"{path}: {field_name} must be an object, got {pattern!r}")
            for key, value in pattern.items():
                _check_regex(rf"(.*\.)?({key})$", f"{path}: {field_name} key {key!r}")
                if not valid(value):
                    raise ValueError(f"{path}: {field_name} values must be {wanted}, got {key!r}: {value!r}")
            patterns[field_name] = pattern
        flags = {}
        for flag in ("use_rslora", "fan_in_fan_out"):
            value = config.get(flag)
            if value is not None and not isinstance(value, bool):
                raise ValueError(f"{path}: {flag} must be true or false, got {value!r}")
            flags[flag] = bool(value)
        saved = config.get("modules_to_save") or []
        if not (isinstance(saved, list) and all(isinstance(m, str) and m for m in saved)):
            raise ValueError(f"{path}: modules_to_save must be a list of module names, got {saved!r}")
        return cls(
            targets, r, float(alpha), patterns["rank_pattern"], patterns["alpha_pattern"], flags["use_rslora"],
            flags["fan_in_fan_out"], saved,
        )  # fmt: skip


def _check_regex(pattern: str, what: str) -> None:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"{what} is not a valid regular expression: {exc}") from None


class _Tensors:
    """Lazy access to the tensors of a safetensors file, or a weights-only ``.bin``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._loaded: dict[str, torch.Tensor] | None = None
        check_readable(path)
        if path.suffix == ".safetensors":
            try:
                with safe_open(str(path), framework="pt") as handle:
                    self.shapes = {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}  # noqa: SIM118
                    self.dtypes = {
                        k: _SAFE_DTYPES.get(dtype, dtype.lower())
                        for k in handle.keys()  # noqa: SIM118
                        for dtype in [handle.get_slice(k).get_dtype()]
                    }
            except (SafetensorError, OSError) as exc:
                raise ValueError(f"{path} cannot be read as safetensors (truncated or corrupt?): {exc}") from None
        else:
            loaded = load_tensor_file(path, "LoRA tensors")
            self._loaded = loaded
            self.shapes = {k: tuple(v.shape) for k, v in loaded.items()}
            self.dtypes = {k: str(v.dtype).removeprefix("torch.") for k, v in loaded.items()}

    def get(self, keys: list[str]) -> list[torch.Tensor]:
        if self._loaded is not None:
            return [self._loaded[k] for k in keys]
        try:
            with safe_open(str(self.path), framework="pt") as handle:
                # copies: a tensor read from the handle maps the file, and keeps (with the kernel's
                # read-around) pages of the other modules resident as long as it lives
                return [handle.get_tensor(k).clone() for k in keys]
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

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"{self.path} is not a folder")
        config_path = self.path / CONFIG_NAME
        if not config_path.exists():
            raise FileNotFoundError(f"{config_path} is missing; is {self.path} a PEFT adapter folder?")
        self.config: dict[str, Any] = read_json_object(config_path)
        self._settings = _Settings.read(self.config, config_path)
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
            if any(len(shapes[k]) in (3, 4, 5) for k in keys.values()):
                unsupported.setdefault("convolution LoRA", []).append(module)
        if unsupported:
            detail = "; ".join(f"{kind}: {sorted(set(mods))[:6]}" for kind, mods in unsupported.items())
            raise ValueError(f"{where}: LoTR cannot represent this adapter ({detail})")
        if not pairs:
            raise ValueError(f"{where} holds no LoRA tensors (lora_A / lora_B)")
        settings = self._settings
        for key in (k for keys in pairs.values() for k in keys.values()):
            if self._tensors.dtypes[key] not in FLOAT_DTYPES:
                raise ValueError(
                    f"{where}: tensor {key!r} has dtype {self._tensors.dtypes[key]}; LoRA factors must be one of "
                    f"{', '.join(FLOAT_DTYPES)}"
                )
        stray = [m for m in sorted(pairs, key=module_order) if not is_target(m, settings.target_modules)]
        if stray:
            raise ValueError(
                f"{where}: modules {stray[:3]} hold LoRA tensors but match none of the target_modules "
                f"{settings.target_modules!r} of {CONFIG_NAME}"
            )
        unsaved = [k for k in extra if not _is_saved(k, settings.modules_to_save)]
        if unsaved:
            raise ValueError(
                f"{where}: tensors {unsaved[:3]} are neither LoRA factors nor in the modules_to_save "
                f"{settings.modules_to_save} of {CONFIG_NAME}"
            )
        modules = {}
        for module in sorted(pairs, key=module_order):
            keys = pairs[module]
            missing = {"lora_A", "lora_B"} - set(keys)
            if missing:
                raise ValueError(f"{where}: module {module!r} lacks {sorted(missing)[0]}.weight")
            for key in keys.values():
                if len(shapes[key]) != 2 or min(shapes[key]) <= 0:
                    raise ValueError(f"{where}: tensor {key!r} has shape {shapes[key]}; LoRA factors are non-empty 2-d")
            (r_a, d_in), (d_out, r_b) = shapes[keys["lora_A"]], shapes[keys["lora_B"]]
            if r_a != r_b:
                raise ValueError(
                    f"{where}: module {module!r} has lora_A {shapes[keys['lora_A']]} and lora_B "
                    f"{shapes[keys['lora_B']]}, whose ranks differ"
                )
            key = pattern_key(settings.rank_pattern, module)
            expected_r = settings.rank_pattern[key] if key is not None else settings.r
            if expected_r != r_a:
                given = "r" if key is None else f"rank_pattern[{key!r}]"
                implied = (
                    "" if key is not None or "r" in self.config else f" (PEFT's default, as {CONFIG_NAME} has no r)"
                )
                raise ValueError(
                    f"{where}: module {module!r} has rank {r_a} but {CONFIG_NAME} says {given}={expected_r}{implied}"
                )
            key = pattern_key(settings.alpha_pattern, module)
            alpha = settings.alpha_pattern[key] if key is not None else settings.alpha
            scale = alpha / math.sqrt(r_a) if settings.use_rslora else alpha / r_a
            if not math.isfinite(scale):
                raise ValueError(f"{where}: module {module!r} has a non-finite scale {scale} (lora_alpha={alpha})")
            modules[module] = LoRAModule(module, d_out, d_in, r_a, scale, keys["lora_A"], keys["lora_B"])
        return modules, extra

    @property
    def fan_in_fan_out(self) -> bool:
        return self._settings.fan_in_fan_out

    @property
    def dtype(self) -> str:
        dtypes = {self._tensors.dtypes[k] for m in self.modules.values() for k in (m.key_a, m.key_b)}
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
        """``(B_l, A_l, scale_l)`` for ``names``; B (d_out, r), A (r, d_in).

        Refuses NaN and Inf values, and updates too large to decompose without overflow in
        the compute dtype (float64 factors stay float64, others are computed in float32):
        ``|scale| ||B|| ||A||`` must stay below ``sqrt(finfo.max) / 1000``.
        """
        keys = [k for n in names for k in (self.modules[n].key_b, self.modules[n].key_a)]
        tensors = self._tensors.get(keys)
        bs, as_ = tensors[0::2], tensors[1::2]
        for i, (b, a) in enumerate(zip(bs, as_, strict=True)):
            if b.dtype != a.dtype:  # a module's B and A in two dtypes: both in the wider, nothing rounded
                common = torch.promote_types(b.dtype, a.dtype)
                bs[i], as_[i] = b.to(common), a.to(common)
        for name, b, a in zip(names, bs, as_, strict=True):
            # one float64 reduction per factor: a NaN or Inf value makes its norm so (no float16 overflows)
            norm_b = float(torch.linalg.vector_norm(b, dtype=torch.float64))
            norm_a = float(torch.linalg.vector_norm(a, dtype=torch.float64))
            if not (math.isfinite(norm_b) and math.isfinite(norm_a)):
                raise ValueError(f"{self.weights_path}: module {name!r} has NaN or Inf values")
            compute = torch.float64 if b.dtype == a.dtype == torch.float64 else torch.float32
            limit = math.sqrt(torch.finfo(compute).max) / 1e3
            bound = abs(self.modules[name].scale) * norm_b * norm_a
            if bound > limit:
                raise ValueError(
                    f"{self.weights_path}: module {name!r} has an update of norm up to {bound:.3g}, too large to "
                    f"decompose in {str(compute).removeprefix('torch.')} (at most {limit:.3g})"
                )
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


def write_peft_lora(out_dir: str | os.PathLike[str], config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Path:
    """Write a PEFT LoRA folder: ``adapter_config.json`` and ``adapter_model.safetensors``.

    ``tensors`` are keyed as PEFT saves them (``base_model.model.<module>.lora_A.weight`` …).
    Each file is written to a temporary name and renamed into place. Tensors holding NaN or
    Inf values (a NaN scale, say) are refused, naming the key.
    """
    folder = Path(out_dir)
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"tensor {key!r} holds NaN or Inf values; refusing to write it to {folder}")
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_file(folder / SAFE_WEIGHTS_NAME, force=True) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
    with atomic_file(folder / CONFIG_NAME, force=True) as tmp:
        tmp.write_text(json.dumps(config, indent=2) + "\n")
    return folder
