"""Find the modules of a model to adapt, and stack them into groups.

The rules (matching, layer index, grouping, Conv1D orientation) live in
:mod:`tensorlotr.adapter.groups`; this module applies them to a model's modules.
"""

from __future__ import annotations

from torch import nn

from ..adapter.config import ALL_LINEAR, DEFAULT_TARGETS, LoTRConfig
from ..adapter.groups import Group, group_modules, is_conv1d, matches, no_match_message, oriented_shape, select_modules

#: Classifier heads that ``"all-linear"`` leaves out of SEQ_CLS models (PEFT's list).
SEQ_CLS_HEADS = ("classifier", "score")


def is_supported(module: nn.Module) -> bool:
    """True for the layers LoTR adapts: ``nn.Linear`` and GPT-2's ``Conv1D``."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def weight_shape(module: nn.Module) -> tuple[int, int]:
    """``(d_out, d_in)`` of a Linear or Conv1D."""
    return oriented_shape(tuple(module.weight.shape), is_conv1d(module))


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
    modules = dict(model.named_modules())
    all_linear = isinstance(patterns, str) and patterns.lower() == ALL_LINEAR
    candidates = [n for n, m in modules.items() if n and (is_supported(m) or not all_linear)]
    names = []
    for name in select_modules(
        candidates, patterns, exclude_modules=config.exclude_modules, layers_to_transform=config.layers_to_transform,
        layers_pattern=config.layers_pattern, heads=_output_heads(model, config.task_type),
    ):  # fmt: skip
        module = modules[name]
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


def _output_heads(model: nn.Module, task_type: str | None) -> list[str]:
    """Module paths that ``"all-linear"`` leaves out: the output embeddings and, for SEQ_CLS, the classifier."""
    get_output = getattr(model, "get_output_embeddings", None)
    output = get_output() if callable(get_output) else None
    heads = [name for name, module in model.named_modules() if output is not None and module is output]
    if task_type == "SEQ_CLS":
        heads += [name for name in SEQ_CLS_HEADS if isinstance(getattr(model, name, None), nn.Module)]
    return heads


def _no_match_message(model: nn.Module, patterns: str | list[str], layers: list[int] | None) -> str:
    adaptable = [name for name, module in model.named_modules() if name and is_supported(module)]
    what = "nn.Linear or Conv1D module" + (f" in layers {layers}" if layers is not None else "")
    return no_match_message(patterns, adaptable, what)


def build_groups(model: nn.Module, names: list[str], config: LoTRConfig) -> list[Group]:
    """Stack the target modules ``names`` of ``model`` into groups as ``config.groups`` says."""
    modules = dict(model.named_modules())
    return group_modules({name: weight_shape(modules[name]) for name in names}, config.groups)


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
