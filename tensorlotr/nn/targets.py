"""Find the modules to adapt and stack them into groups."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn

from .config import DEFAULT_TARGETS, LoTRConfig

_LAYER_INDEX = re.compile(r"(?<=\.)(\d+)(?=\.|$)")


def conv1d_type() -> type | None:
    """transformers' GPT-2 ``Conv1D``, whose weight is stored (d_in, d_out)."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    return Conv1D


def is_supported(module: nn.Module) -> bool:
    conv1d = conv1d_type()
    return isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d))


def weight_shape(module: nn.Module) -> tuple[int, int]:
    """``(d_out, d_in)`` of a Linear or Conv1D."""
    d0, d1 = module.weight.shape
    return (int(d1), int(d0)) if not isinstance(module, nn.Linear) else (int(d0), int(d1))


def layer_index(name: str) -> int | None:
    """The first number component of a module path: ``encoder.layer.3.query`` -> 3."""
    found = _LAYER_INDEX.search(name)
    return int(found.group(1)) if found else None


def layer_pattern(name: str) -> str:
    """The module path with its layer index replaced by ``*``."""
    return _LAYER_INDEX.sub("*", name, count=1)


def matches(name: str, patterns: str | Iterable[str]) -> bool:
    """PEFT's rule: a string is a regex matched in full; a list holds name suffixes."""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) or _is_regex_match(p, name) for p in patterns)


def _is_regex_match(pattern: str, name: str) -> bool:
    if not any(c in pattern for c in "*+?[]()|^$\\"):
        return False
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False


def resolve_targets(model: nn.Module, config: LoTRConfig) -> list[str]:
    """Names of the modules to adapt, in model order.

    Raises ``ValueError`` when nothing matches (listing close names) or when a matched
    module is not an ``nn.Linear`` or ``Conv1D``.
    """
    patterns = config.target_modules
    if patterns is None and isinstance(config.groups, dict):
        patterns = [p for group in config.groups.values() for p in group]
    if patterns is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in DEFAULT_TARGETS:
            raise ValueError(f"target_modules is required for model type {model_type!r}")
        patterns = DEFAULT_TARGETS[model_type]
    names = []
    for name, module in model.named_modules():
        if not name or not matches(name, patterns):
            continue
        if config.layers_to_transform is not None and layer_index(name) not in config.layers_to_transform:
            continue
        if not is_supported(module):
            if any(is_supported(child) for child in module.modules()):
                continue  # a container whose name matches; its Linear children may match too
            raise ValueError(
                f"module {name!r} is a {type(module).__name__}; LoTR adapts nn.Linear and GPT-2 Conv1D only"
            )
        names.append(name)
    if not names:
        raise ValueError(_no_match_message(model, patterns, config.layers_to_transform))
    return names


def _no_match_message(model: nn.Module, patterns: str | list[str], layers: list[int] | None) -> str:
    linear_names = [name for name, module in model.named_modules() if name and is_supported(module)]
    suffixes = sorted({name.rsplit(".", 1)[-1] for name in linear_names})
    wanted = [patterns] if isinstance(patterns, str) else list(patterns)
    close = sorted({c for p in wanted for c in difflib.get_close_matches(p.rsplit(".", 1)[-1], suffixes, n=5)})
    message = f"target_modules {patterns!r} match no nn.Linear or Conv1D module"
    if layers is not None:
        message += f" in layers {layers}"
    if close:
        message += f"; close names: {close}"
    return message + f"; adaptable module names: {suffixes}"


@dataclass(frozen=True)
class Group:
    """One stack: the modules whose updates share ``U`` (d_out, r_out) and ``V`` (d_in, r_in)."""

    name: str
    modules: tuple[str, ...]
    shape: tuple[int, int]


def _short_names(patterns: list[str]) -> dict[str, str]:
    """The shortest unique dotted suffix of each pattern, without the layer ``*``."""
    out = {}
    for pattern in patterns:
        parts = pattern.split(".")
        for k in range(1, len(parts) + 1):
            suffix = ".".join(parts[-k:])
            if sum(p == suffix or p.endswith("." + suffix) for p in patterns) == 1:
                break
        out[pattern] = suffix.replace(".*.", ".").replace("*.", "").replace(".", "_")
    return out


def build_groups(model: nn.Module, names: list[str], config: LoTRConfig) -> list[Group]:
    """Stack the target modules ``names`` of ``model`` into groups as ``config.groups`` says."""
    modules = dict(model.named_modules())
    return group_modules({name: weight_shape(modules[name]) for name in names}, config.groups)


def group_modules(shapes: dict[str, tuple[int, int]], mode: str | dict[str, list[str]] = "by_name") -> list[Group]:
    """Stack modules into groups.

    Parameters
    ----------
    shapes : dict of module path to (d_out, d_in)
        The modules to stack, in model order.
    mode : "by_name", "shared" or dict of group name to patterns
        ``"by_name"``: one group per module path with the layer index removed, split by
        shape when a path pattern holds several shapes. ``"shared"``: one group per shape.
        A dict: each module goes to the one group whose patterns match it.

    Raises ``ValueError`` naming the modules and shapes when an explicit group mixes shapes.
    """
    names = list(shapes)
    by_key: dict[tuple[str, tuple[int, int]], list[str]] = {}
    for name in names:
        by_key.setdefault((layer_pattern(name), shapes[name]), []).append(name)
    patterns = list(dict.fromkeys(pattern for pattern, _ in by_key))
    short = _short_names(patterns)
    split = {p for p in patterns if sum(key[0] == p for key in by_key) > 1}

    def key_name(key: tuple[str, tuple[int, int]]) -> str:
        pattern, (d_out, d_in) = key
        return f"{short[pattern]}_{d_out}x{d_in}" if pattern in split else short[pattern]

    members: dict[str, list[str]] = {}
    if mode == "by_name":
        for key, group_names in by_key.items():
            members[key_name(key)] = group_names
    elif mode == "shared":
        by_shape: dict[tuple[int, int], list[tuple[str, tuple[int, int]]]] = {}
        for key in by_key:
            by_shape.setdefault(key[1], []).append(key)
        for keys in by_shape.values():
            group_names = [n for n in names if (layer_pattern(n), shapes[n]) in keys]  # model order
            members["+".join(key_name(k) for k in keys)] = group_names
    elif isinstance(mode, dict):
        for name in names:
            owners = [g for g, pats in mode.items() if matches(name, pats)]
            if len(owners) != 1:
                where = f"groups {owners}" if owners else "no group"
                raise ValueError(f"module {name!r} is in {where}; each target must be in exactly one group")
            members.setdefault(owners[0], []).append(name)
    else:
        raise ValueError(f"groups must be 'by_name', 'shared' or a dict of patterns, got {mode!r}")
    groups = []
    for group_name, group_names in members.items():
        group_shapes = {shapes[n] for n in group_names}
        if len(group_shapes) > 1:
            listing = ", ".join(f"{n} {shapes[n][0]}x{shapes[n][1]}" for n in group_names)
            raise ValueError(f"group {group_name!r} mixes weight shapes (d_out x d_in): {listing}")
        groups.append(Group(group_name, tuple(group_names), group_shapes.pop()))
    return groups


def resolve_modules_to_save(model: nn.Module, patterns: list[str] | None) -> list[str]:
    """Names of the modules listed in ``modules_to_save`` (outermost matches only)."""
    if not patterns:
        return []
    found: list[str] = []
    for name, _ in model.named_modules():
        if name and matches(name, patterns) and not any(name.startswith(f + ".") for f in found):
            found.append(name)
    missing = [p for p in patterns if not any(matches(n, [p]) for n in found)]
    if missing:
        raise ValueError(f"modules_to_save {missing} match no module of the model")
    return found
