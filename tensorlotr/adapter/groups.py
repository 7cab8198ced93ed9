"""Which modules an adapter targets, and how they stack into groups: names and shapes only.

Everything here works on module paths (``encoder.layer.3.attention.self.query``) and
``(d_out, d_in)`` shapes, so the file jobs (convert, decompose) and the torch bindings
share one set of rules:

- target matching, as PEFT matches ``target_modules`` (never inside a module of ``modules_to_save``);
- the modules PEFT's task models train in full (``TASK_MODULES_TO_SAVE``);
- the layer index of a path, and the path pattern with it replaced by ``*``;
- module order (layer 10 after layer 9);
- grouping modules into stacks by path pattern and shape;
- the orientation of GPT-2's ``Conv1D``, which stores its weight ``(d_in, d_out)``.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from dataclasses import dataclass

_LAYER_INDEX = re.compile(r"(?<=\.)(\d+)(?=\.|$)")

#: The modules PEFT's task models (``PeftModelForSequenceClassification``, …) add to ``modules_to_save``, by
#: ``task_type``: the task's head, trained in full, wrapped where the model has one (a missing one is no error).
TASK_MODULES_TO_SAVE: dict[str, tuple[str, ...]] = {
    "SEQ_CLS": ("classifier", "score"),
    "TOKEN_CLS": ("classifier", "score"),
    "QUESTION_ANS": ("qa_outputs",),
}

#: Model types whose Linear-like layers are transformers' ``Conv1D`` (weight stored (d_in, d_out)).
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt"})


def conv1d_type() -> type | None:
    """transformers' GPT-2 ``Conv1D``, whose weight is stored ``(d_in, d_out)``."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    return Conv1D


def is_conv1d(module: object) -> bool:
    """True for a transformers ``Conv1D`` module."""
    conv1d = conv1d_type()
    return conv1d is not None and isinstance(module, conv1d)


def oriented_shape(stored: tuple[int, ...], fan_in_fan_out: bool) -> tuple[int, int]:
    """``(d_out, d_in)`` of a 2-d weight stored as ``stored``; Conv1D stores ``(d_in, d_out)``."""
    d0, d1 = (int(n) for n in stored)
    return (d1, d0) if fan_in_fan_out else (d0, d1)


def layer_index(name: str, layers_pattern: str | Iterable[str] | None = None) -> int | None:
    """The layer index of a module path: ``encoder.layer.3.query`` -> 3.

    With ``layers_pattern`` (``"layer"``, ``["h", "layers"]``), the number right after one of
    those path components, as PEFT reads it; otherwise the first number component.

    Examples
    --------
    >>> layer_index("encoder.layer.3.attention.self.query")
    3
    >>> layer_index("model.layers.12.mlp.experts.7.up_proj", layers_pattern="layers")
    12
    >>> layer_index("classifier") is None
    True
    """
    if layers_pattern is None:
        found = _LAYER_INDEX.search(name)
        return int(found.group(1)) if found else None
    names = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern)
    alternatives = "|".join(re.escape(n) for n in names)
    found = re.search(rf"(?:^|\.)(?:{alternatives})\.(\d+)(?:\.|$)", name)
    return int(found.group(1)) if found else None


def select_modules(
    candidates: Iterable[str],
    target_modules: str | Iterable[str],
    *,
    exclude_modules: str | Iterable[str] | None = None,
    layers_to_transform: int | Iterable[int] | None = None,
    layers_pattern: str | Iterable[str] | None = None,
    heads: Iterable[str] = (),
    modules_to_save: Iterable[str] = (),
) -> list[str]:
    """The module paths among ``candidates`` that an adapter targets, in the given order.

    ``target_modules`` follows :func:`matches`; ``"all-linear"`` takes every candidate but
    ``heads`` (the output head, which the caller finds). ``exclude_modules`` uses the same
    matching rule; ``layers_to_transform`` keeps the listed layer indices (or the one index; see
    :func:`layer_index`). A module of ``modules_to_save``, or inside one, is never a target
    (:func:`in_modules_to_save`), as in PEFT: it is trained in full instead.

    Examples
    --------
    >>> names = ["layer.0.query", "layer.0.dense", "classifier"]
    >>> select_modules(names, "all-linear", modules_to_save=["classifier"])
    ['layer.0.query', 'layer.0.dense']
    >>> select_modules(names, ["query"], layers_to_transform=1)
    []
    """
    saved = list(modules_to_save)
    all_linear = isinstance(target_modules, str) and target_modules.lower() == "all-linear"
    skipped = set(heads) if all_linear else set()
    if isinstance(layers_to_transform, int):
        layers_to_transform = [layers_to_transform]
    layers = None if layers_to_transform is None else set(layers_to_transform)
    chosen = []
    for name in candidates:
        if name in skipped or not (all_linear or matches(name, target_modules)):
            continue
        if exclude_modules is not None and matches(name, exclude_modules):
            continue
        if saved and in_modules_to_save(name, saved):
            continue
        if layers is not None and layer_index(name, layers_pattern) not in layers:
            continue
        chosen.append(name)
    return chosen


def in_modules_to_save(name: str, modules_to_save: Iterable[str]) -> bool:
    """True when module ``name`` is one of ``modules_to_save`` or inside one: PEFT's rule, which never adapts them.

    Each entry is a name suffix (or a regex) matched at a path-component boundary, as PEFT's
    ``check_target_module_exists`` does.

    Examples
    --------
    >>> in_modules_to_save("classifier", ["classifier"]), in_modules_to_save("classifier.out_proj", ["classifier"])
    (True, True)
    >>> in_modules_to_save("bert.pooler.dense", ["classifier"])
    False
    """
    for pattern in modules_to_save:
        try:
            if re.match(rf"(^|.*\.){pattern}($|\..*)", name):
                return True
        except re.error:
            if name == pattern or name.endswith("." + pattern) or f".{pattern}." in f".{name}.":
                return True
    return False


def layer_pattern(name: str) -> str:
    """The module path with its layer index replaced by ``*``: the name of its stack.

    Examples
    --------
    >>> layer_pattern("encoder.layer.3.attention.self.query")
    'encoder.layer.*.attention.self.query'
    """
    return _LAYER_INDEX.sub("*", name, count=1)


def module_order(name: str) -> tuple[int, str]:
    """Sort key: the layer index first (so layer 10 follows layer 9), then the path.

    Examples
    --------
    >>> sorted(["model.layers.10.q_proj", "model.layers.9.q_proj"], key=module_order)
    ['model.layers.9.q_proj', 'model.layers.10.q_proj']
    """
    index = layer_index(name)
    return (-1 if index is None else index, name)


def matches(name: str, patterns: str | Iterable[str]) -> bool:
    """PEFT's rule: a string is a regex matched in full; a list holds name suffixes.

    List items that look like regular expressions are also tried as one.

    Examples
    --------
    >>> matches("encoder.layer.0.attention.self.query", ["query", "value"])
    True
    >>> matches("model.layers.0.self_attn.q_proj", r".*\\.(q|v)_proj")
    True
    >>> matches("model.layers.0.self_attn.k_proj", ["q_proj"])
    False
    """
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


def no_match_message(patterns: str | Iterable[str], candidates: Iterable[str], what: str) -> str:
    """The error for targets that match nothing: close names and the names there are.

    ``candidates`` are module paths that could be adapted; ``what`` names what was searched
    ("nn.Linear or Conv1D module", "2-d weight of base/").
    """
    suffixes = sorted({name.rsplit(".", 1)[-1] for name in candidates})
    wanted = [patterns] if isinstance(patterns, str) else list(patterns)
    close = sorted({c for p in wanted for c in difflib.get_close_matches(p.rsplit(".", 1)[-1], suffixes, n=5)})
    message = f"target_modules {patterns!r} match no {what}"
    if close:
        message += f"; close names: {close}"
    shown = suffixes[:30]
    more = f" and {len(suffixes) - 30} more" if len(suffixes) > 30 else ""
    return message + f"; adaptable module names: {shown}{more}"


@dataclass(frozen=True)
class Group:
    """One stack: the modules whose updates share ``U`` (d_out, r_out) and ``V`` (d_in, r_in).

    ``shape`` is every module's ``(d_out, d_in)``; ``modules`` are in model order, one layer
    each, so the group's stack is ``(len(modules), d_out, d_in)``. :func:`group_modules`
    makes them.

    Examples
    --------
    >>> Group("query", ("encoder.layer.0.attention.self.query",), (384, 384)).shape
    (384, 384)
    """

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

    Returns
    -------
    list of Group
        In model order of their first module; each group's modules in model order.

    Raises
    ------
    ValueError
        Naming the modules and shapes when an explicit group mixes shapes, or a module
        that is in no group or in several.

    Examples
    --------
    Two layers of a BERT's query and value projections, each (d_out, d_in) = (384, 384):

    >>> shapes = {f"encoder.layer.{i}.attention.self.{p}": (384, 384) for i in (0, 1) for p in ("query", "value")}
    >>> [(g.name, len(g.modules), g.shape) for g in group_modules(shapes)]
    [('query', 2, (384, 384)), ('value', 2, (384, 384))]
    >>> [(g.name, len(g.modules)) for g in group_modules(shapes, "shared")]
    [('query+value', 4)]
    >>> [g.name for g in group_modules(shapes, {"attn": ["query", "value"]})]
    ['attn']
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
