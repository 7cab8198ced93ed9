"""``LoTRConfig``: what to adapt, at which rank, and how to start."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, Unpack

import numpy as np

from ..core import normalize_rank
from ..files.atomic import atomic_file
from ..files.hub import HubOptions, resolve_folder

#: The file of a LoTR adapter (or config-only) folder that holds its config.
CONFIG_NAME = "lotr_config.json"
#: The version of the folder format that this code writes and reads.
FORMAT_VERSION = 1
INITS = ("zeros", "normal", "svd")
GROUP_MODES = ("by_name", "shared")
#: Dtypes the adapter's factors and cores may be kept in (``adapter_dtype``).
ADAPTER_DTYPES = ("float32", "float64", "bfloat16", "float16")
#: ``target_modules`` shorthand for every linear layer but the output head, as PEFT defines it.
ALL_LINEAR = "all-linear"
#: PEFT's task types (``peft.TaskType``).
TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")

DEFAULT_TARGETS: dict[str, list[str]] = {
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "deberta-v2": ["query_proj", "value_proj"],
    "distilbert": ["q_lin", "v_lin"],
    "gpt2": ["c_attn"],
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "opt": ["q_proj", "v_proj"],
}
"""Targets used when ``target_modules`` is None, by ``model.config.model_type`` (as PEFT's defaults).

Examples
--------
>>> DEFAULT_TARGETS["llama"]
['q_proj', 'v_proj']
"""

Rank = int | tuple[int, int]
_T = TypeVar("_T")


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _rank_pair(rank: Rank, what: str) -> tuple[int, int]:
    """``rank`` as ``(r_out, r_in)``; ``ValueError`` naming ``what`` for anything else (2.5, "8", True)."""
    parts = [rank] if not isinstance(rank, (list, tuple)) else list(rank)
    if rank is None or not parts or not all(_is_int(p) for p in parts):
        raise ValueError(f"{what} must be an int or a pair (r_out, r_in) of ints, got {rank!r}")
    try:
        pair = normalize_rank(rank)
    except ValueError as exc:
        raise ValueError(f"{what}: {exc}") from None
    assert pair is not None
    return pair


def _names(value: Any, what: str, *, regex: bool) -> list[str] | str | None:
    """A list of non-empty names (a tuple or set becomes a list), or with ``regex`` one string; else ``ValueError``."""
    if value is None:
        return None
    if isinstance(value, str):
        if not regex:
            return [value]
        if not value:
            raise ValueError(f"{what} must not be an empty string")
        if value != ALL_LINEAR:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"{what} {value!r} is not a valid regular expression: {exc}") from None
        return value
    if isinstance(value, (list, tuple, set, frozenset)) and all(isinstance(v, str) and v for v in value):
        return sorted(value) if isinstance(value, (set, frozenset)) else list(value)
    wanted = "a list of module names or one regular expression" if regex else "a list of module names"
    raise ValueError(f"{what} must be {wanted}, got {value!r}")


@dataclass
class LoTRConfig:
    """Configuration of LoTR adapters, JSON-serialisable like PEFT's configs.

    Parameters
    ----------
    rank : int or (r_out, r_in)
        Tucker-2 ranks of each group: ``U`` is (d_out, r_out), ``V`` is (d_in, r_in).
    alpha : float
        Scale numerator: the adapter adds ``alpha / r * U G_l V^T`` with
        ``r = min(r_out, r_in)``, the rank of the equivalent LoRA (so exporting to PEFT
        with ``lora_alpha = alpha`` keeps the same scaling).
    target_modules : list of str or str, optional
        Module name suffixes (``"query"`` matches ``….attention.self.query``), or one
        regular expression matched against the full name, as in PEFT. ``"all-linear"``
        targets every ``nn.Linear`` / ``Conv1D`` but the output head (and, with
        ``task_type="SEQ_CLS"``, the classifier). ``None`` picks a default for known model types.
    exclude_modules : list of str or str, optional
        Modules never adapted: suffixes, or one regex matched in full, as ``target_modules``.
    layers_to_transform : int or list of int, optional
        Only modules whose layer index is listed: the number after ``layers_pattern`` in the
        path, or the first number in it.
    layers_pattern : str or list of str, optional
        The name of the layer list (``"layers"``, ``"h"``), as in PEFT.
    groups : "by_name", "shared" or dict of str to list of str
        How targets are stacked into tensors. ``"by_name"``: one tensor per target name
        across layers (all ``query`` projections form one stack). ``"shared"``: one tensor
        for all targets of the same shape (query and value share U and V, as in the
        paper's RoBERTa set-up). A dict maps group names to patterns (suffixes or regexes).
    init : "zeros", "normal" or "svd"
        ``"zeros"``: zero cores, random orthonormal factors (the adapter starts at exactly
        zero). ``"normal"``: zero cores, Gaussian factors with std ``1/sqrt(d)`` (``d_out``
        for ``U``, ``d_in`` for ``V``: columns of about unit norm; the original code draws
        std 1). ``"svd"``: factors from the Tucker-2 of the pretrained weights of the group,
        zero cores.
    dropout : float
        Dropout on the adapter's input.
    modules_to_save : list of str, optional
        Modules (name suffixes) trained in full and saved with the adapter, e.g.
        ``["classifier"]``.
    rank_pattern, alpha_pattern : dict of str, optional
        Overrides of ``rank`` and ``alpha``, keyed as PEFT keys them, by a module-name regex
        matched at the end of the path (``"q_proj"``, ``"layers.0.self_attn.q_proj"``),
        or by group name. A group's modules share one rank, so a key must give all of a
        group's modules the same value.
    task_type : str, optional
        PEFT's task type (``"SEQ_CLS"``, ``"CAUSAL_LM"``, …), kept in the config.
    inference_mode : bool
        Saved adapters are loaded frozen when true, as in PEFT.
    adapter_dtype : str, optional
        Dtype of the factors and cores: ``"float32"``, ``"float64"``, ``"bfloat16"`` or
        ``"float16"``. ``None``: float32 (float64 on a float64 base), as PEFT keeps adapter
        weights in float32 whatever the base's dtype.
    extra : dict
        Keys of a saved config this version does not know, kept (and saved again) rather
        than dropped; loading such a config warns.

    Examples
    --------
    Ranks ``(r_out, r_in) = (16, 8)``: each group's ``U`` is (d_out, 16), ``V`` is (d_in, 8)
    and each layer's core is (16, 8); the update is scaled by ``alpha / min(16, 8)``.

    >>> from tensorlotr import LoTRConfig
    >>> config = LoTRConfig(rank=(16, 8), alpha=16, target_modules=["query", "value"])
    >>> config.rank_of("query"), config.scale_of("query")
    ((16, 8), 2.0)
    >>> config.to_dict()["rank"]
    [16, 8]
    >>> LoTRConfig.from_dict(config.to_dict()) == config
    True
    """

    rank: Rank = 8
    alpha: float = 8.0
    target_modules: list[str] | str | None = None
    layers_to_transform: list[int] | int | None = None
    groups: str | dict[str, list[str]] = "by_name"
    init: str = "zeros"
    dropout: float = 0.0
    modules_to_save: list[str] | None = None
    rank_pattern: dict[str, Rank] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    exclude_modules: list[str] | str | None = None
    layers_pattern: list[str] | str | None = None
    task_type: str | None = None
    inference_mode: bool = False
    adapter_dtype: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.rank = _rank_pair(self.rank, "rank")
        for name in ("rank_pattern", "alpha_pattern", "extra"):
            value = getattr(self, name)
            if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
                raise ValueError(f"{name} must be a dict keyed by strings, got {value!r}")
        self.rank_pattern = {k: _rank_pair(v, f"rank_pattern[{k!r}]") for k, v in self.rank_pattern.items()}
        self.target_modules = _names(self.target_modules, "target_modules", regex=True)
        self.exclude_modules = _names(self.exclude_modules, "exclude_modules", regex=True)
        if not isinstance(self.layers_pattern, str):  # one name stays a string, as in PEFT
            self.layers_pattern = _names(self.layers_pattern, "layers_pattern", regex=False)
        self.modules_to_save = _names(self.modules_to_save, "modules_to_save", regex=False)  # type: ignore[assignment]
        if _is_int(self.layers_to_transform):
            self.layers_to_transform = [int(self.layers_to_transform)]  # type: ignore[arg-type]
        layers = self.layers_to_transform
        if layers is not None and not (
            isinstance(layers, (list, tuple)) and all(_is_int(i) and i >= 0 for i in layers)
        ):
            raise ValueError(f"layers_to_transform must be a layer index or a list of them (ints >= 0), got {layers!r}")
        if layers is not None:
            self.layers_to_transform = [int(i) for i in layers]
        for name in ("inference_mode",):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if not isinstance(self.groups, (str, dict)):
            raise ValueError(f"groups must be one of {GROUP_MODES} or a dict of patterns, got {self.groups!r}")
        if isinstance(self.groups, dict):
            for name, patterns in self.groups.items():
                if not (isinstance(patterns, str) and patterns) and not (
                    isinstance(patterns, (list, tuple)) and patterns and all(isinstance(p, str) and p for p in patterns)
                ):
                    raise ValueError(
                        f"groups[{name!r}] must be a pattern or a non-empty list of them, got {patterns!r}"
                    )
        if not _is_number(self.dropout):
            raise ValueError(f"dropout must be a number in [0, 1), got {self.dropout!r}")
        alphas = [("alpha", self.alpha), *((f"alpha_pattern[{k!r}]", v) for k, v in self.alpha_pattern.items())]
        for what, value in alphas:
            if not _is_number(value):
                raise ValueError(f"{what} must be a positive finite number, got {value!r}")
        if self.layers_pattern is not None and self.layers_to_transform is None:
            raise ValueError("layers_pattern needs layers_to_transform, as in PEFT")
        if self.task_type is not None and self.task_type not in TASK_TYPES:
            raise ValueError(f"task_type must be one of {TASK_TYPES}, got {self.task_type!r}")
        for name, pattern in (("rank_pattern", self.rank_pattern), ("alpha_pattern", self.alpha_pattern)):
            for key in pattern:
                try:
                    re.compile(key)
                except re.error as exc:
                    raise ValueError(f"{name} key {key!r} is not a valid regular expression: {exc}") from None
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        if self.adapter_dtype is not None and self.adapter_dtype not in ADAPTER_DTYPES:
            raise ValueError(f"adapter_dtype must be one of {ADAPTER_DTYPES} or None, got {self.adapter_dtype!r}")
        if isinstance(self.groups, str) and self.groups not in GROUP_MODES:
            raise ValueError(f"groups must be one of {GROUP_MODES} or a dict of patterns, got {self.groups!r}")
        if isinstance(self.groups, dict):
            self.groups = {str(k): [v] if isinstance(v, str) else list(v) for k, v in self.groups.items()}
            for name in self.groups:
                if not name or "." in name:
                    raise ValueError(f"group names must be non-empty and contain no '.', got {name!r}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        alphas = [("alpha", self.alpha), *((f"alpha_pattern[{k!r}]", v) for k, v in self.alpha_pattern.items())]
        for what, value in alphas:
            if not 0.0 < float(value) < float("inf"):  # NaN fails too
                raise ValueError(f"{what} must be a positive finite number, got {value!r}")

    def rank_of(self, group: str, modules: tuple[str, ...] | list[str] = ()) -> tuple[int, int]:
        """``(r_out, r_in)`` of ``group``, whose module paths are ``modules``."""
        return _rank_pair(self._pattern_value(self.rank_pattern, self.rank, group, modules, "rank_pattern"), "rank")

    def scale_of(self, group: str, modules: tuple[str, ...] | list[str] = ()) -> float:
        """``alpha / min(r_out, r_in)`` of ``group``."""
        alpha = self._pattern_value(self.alpha_pattern, self.alpha, group, modules, "alpha_pattern")
        return float(alpha) / min(self.rank_of(group, modules))

    @staticmethod
    def _pattern_value(pattern: Mapping[str, _T], default: _T, group: str, modules: Iterable[str], what: str) -> _T:
        """A group's value from ``pattern``: by group name, else by PEFT's module-regex rule."""
        if group in pattern:
            return pattern[group]
        values: dict[str, _T] = {}
        for module in modules:
            key = next((k for k in pattern if re.match(rf"(.*\.)?({k})$", module)), None)
            values[module] = pattern[key] if key is not None else default
        distinct = {repr(v): v for v in values.values()}
        if len(distinct) > 1:
            listing = ", ".join(f"{m}: {v}" for m, v in values.items())
            raise ValueError(
                f"{what} gives the modules of group {group!r} different values ({listing}); the modules of a group "
                "share one value, so split them into groups of their own with groups={{...}}"
            )
        return next(iter(distinct.values())) if distinct else default

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; ranks become lists; keys kept in ``extra`` come back at the top level."""
        out = dataclasses.asdict(self)
        extra = out.pop("extra")
        out["rank"] = list(_rank_pair(self.rank, "rank"))
        out["rank_pattern"] = {k: list(_rank_pair(v, k)) for k, v in self.rank_pattern.items()}
        return {**extra, **out}

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, strict: bool = True) -> LoTRConfig:
        """The inverse of :meth:`to_dict`.

        Unknown keys raise ``ValueError``, or with ``strict=False`` are kept in ``extra``
        with a warning that names them (what loading a saved adapter does).
        """
        if not isinstance(data, dict):
            raise ValueError(f"a LoTRConfig must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        unknown = sorted(set(data) - known)
        if unknown and strict:
            raise ValueError(f"unknown LoTRConfig fields: {unknown}")
        if unknown:
            warnings.warn(
                f"LoTRConfig: keeping fields this version does not know: {unknown}", UserWarning, stacklevel=2
            )
        extra = {**data.get("extra", {}), **{k: data[k] for k in unknown}}
        return cls(**{k: v for k, v in data.items() if k in known}, extra=extra)

    def save_pretrained(self, save_directory: str | os.PathLike[str]) -> Path:
        """Write this config as ``lotr_config.json`` in ``save_directory`` (no tensors)."""
        return write_config(save_directory, self.to_dict())

    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike[str], **hub_kwargs: Unpack[HubOptions]) -> LoTRConfig:
        """The config of a saved adapter (or config) folder, or of a Hub repo id.

        ``hub_kwargs`` (``subfolder``, ``revision``, ``token``, ``cache_dir``,
        ``local_files_only``) go to the Hub; see :func:`tensorlotr.io.hub.resolve_folder`.
        """
        return cls.from_dict(read_config(resolve_folder(path_or_id, what="LoTR config", **hub_kwargs)), strict=False)


def write_config(out_dir: str | os.PathLike[str], config: dict[str, Any]) -> Path:
    """Write a config-only ``lotr_config.json`` (no groups, no tensors) into ``out_dir``.

    Returns the file's path. ``LoTRConfig.save_pretrained`` writes its config this way.

    Examples
    --------
    >>> print(write_config("my-config", {"rank": [16, 8], "target_modules": ["q_proj", "v_proj"]}))
    my-config/lotr_config.json
    >>> read_config("my-config")
    {'rank': [16, 8], 'target_modules': ['q_proj', 'v_proj']}
    """
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    document = {"format": "tensorlotr", "format_version": FORMAT_VERSION, "config": config}
    with atomic_file(folder / CONFIG_NAME, force=True) as tmp:
        tmp.write_text(json.dumps(document, indent=2) + "\n")
    return folder / CONFIG_NAME


def read_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``config`` of ``path/lotr_config.json`` (an adapter or a config-only folder).

    Ranks are lists, ``[r_out, r_in]`` or one number, as written.

    Examples
    --------
    >>> from tensorlotr import LoTRConfig
    >>> _ = LoTRConfig(rank=(16, 8), target_modules=["q_proj"]).save_pretrained("saved-config")
    >>> config = read_config("saved-config")
    >>> config["rank"], config["target_modules"]
    ([16, 8], ['q_proj'])
    """
    config_path = Path(path) / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} is missing; is {path} a LoTR adapter folder?")
    try:
        document = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{config_path} is not valid JSON: {exc}") from None
    if not isinstance(document, dict) or document.get("format") != "tensorlotr":
        raise ValueError(f"{config_path} is not a tensorlotr config")
    config = document.get("config")
    if not isinstance(config, dict):
        raise ValueError(f"{config_path} has no 'config' object")
    return config
