"""Find the modules of a model to adapt, and stack them into groups.

The rules (matching, layer index, grouping, Conv1D orientation) live in
:mod:`tensorlotr.adapter.groups`; this module applies them to a model's modules.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

from ..adapter.config import ALL_LINEAR, DEFAULT_TARGETS, LoTRConfig
from ..adapter.groups import (
    TASK_MODULES_TO_SAVE,
    Group,
    group_modules,
    is_conv1d,
    matches,
    no_match_message,
    oriented_shape,
    select_modules,
)

#: Classifier heads that ``"all-linear"`` leaves out of SEQ_CLS models (PEFT's list).
SEQ_CLS_HEADS = ("classifier", "score")


def is_supported(module: nn.Module) -> bool:
    """True for the layers LoTR adapts: ``nn.Linear`` and GPT-2's ``Conv1D``."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def quantization(module: nn.Module) -> str | None:
    """``"4bit"`` for a bitsandbytes ``Linear4bit`` (nf4 or fp4), ``"8bit"`` for ``Linear8bitLt``, else None.

    bitsandbytes is looked up among the loaded modules only: a model holding its layers has imported it.
    """
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:
        return None
    if isinstance(module, bnb.nn.Linear4bit):
        return "4bit"
    if isinstance(module, bnb.nn.Linear8bitLt):
        return "8bit"
    return None


def weight_shape(module: nn.Module) -> tuple[int, int]:
    """``(d_out, d_in)`` of a Linear or Conv1D.

    A bitsandbytes 4-bit weight is stored packed, two values a byte, as ``(d_out * d_in / 2, 1)``
    (or repacked for the CPU kernels), so its shape is the module's ``out_features`` x ``in_features``.
    """
    if quantization(module) == "4bit":
        layer: Any = module  # a bitsandbytes Linear4bit
        return int(layer.out_features), int(layer.in_features)
    return oriented_shape(tuple(weight_of(module).shape), is_conv1d(module))


def weight_of(module: nn.Module) -> torch.Tensor:
    """The ``weight`` tensor of a Linear, Conv1D or bitsandbytes layer, as stored (4-bit weights packed).

    Examples
    --------
    >>> tuple(weight_of(torch.nn.Linear(3, 2)).shape)
    (2, 3)
    """
    weight = module.weight
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"a {type(module).__name__} has no weight tensor")
    return weight


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The weight of an adaptable module as a floating (d_out, d_in) matrix, dequantized if need be.

    4-bit weights are dequantized with their ``quant_state`` (nf4 or fp4, as quantized); 8-bit
    weights from their int8 rows and row scales (``SCB``). Before quantization (a weight that has
    not been moved to a device yet) the stored floating weight is returned.
    """
    kind = quantization(module)
    layer: Any = module  # bitsandbytes layers and weights carry their quantization state as attributes
    weight: Any = weight_of(module)
    if kind == "4bit" and getattr(weight, "bnb_quantized", False):
        import bitsandbytes as bnb

        if getattr(weight.quant_state, "packing_format_for_cpu", False):
            # bitsandbytes repacks 4-bit weights in place for its CPU inference kernel; undo it as its
            # own Linear4bit._save_to_state_dict does before reading them
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)
            layer.quant_state = weight.quant_state
        dense: torch.Tensor = bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
        return dense
    if kind == "8bit" and weight.dtype == torch.int8:
        import bitsandbytes as bnb

        row_scales = weight.SCB if getattr(weight, "SCB", None) is not None else layer.state.SCB
        dense = bnb.functional.int8_vectorwise_dequant(weight.data, row_scales)
        return dense
    stored: torch.Tensor = weight.T if is_conv1d(module) else weight
    return stored


def _bitsandbytes() -> Any:
    """bitsandbytes, whose parameter classes its annotations type too narrowly to build them here."""
    import bitsandbytes

    return bitsandbytes


@torch.no_grad()
def set_dense_weight(module: nn.Module, dense: torch.Tensor) -> None:
    """Store the (d_out, d_in) matrix ``dense`` as ``module``'s weight, quantized again for bitsandbytes layers.

    A 4-bit layer gets a new ``Params4bit`` with the same quant type, block size and storage,
    quantized on the weight's device (as PEFT merges into 4-bit layers); an 8-bit layer a new
    ``Int8Params`` (its cached int8 state is reset). Other layers are written in place, in their dtype.
    """
    kind = quantization(module)
    layer: Any = module  # bitsandbytes layers and weights carry their quantization state as attributes
    weight: Any = weight_of(module)
    if kind == "4bit" and getattr(weight, "bnb_quantized", False):
        bnb = _bitsandbytes()
        state = weight.quant_state
        layer.weight = bnb.nn.Params4bit(
            dense.to(state.dtype).cpu(), requires_grad=False, blocksize=weight.blocksize,
            compress_statistics=weight.compress_statistics, quant_type=weight.quant_type,
            quant_storage=weight.quant_storage, module=layer,
        ).to(weight.device)  # fmt: skip
    elif kind == "8bit" and weight.dtype == torch.int8:
        bnb = _bitsandbytes()
        int8 = bnb.nn.Int8Params(dense.cpu(), requires_grad=False, has_fp16_weights=weight.has_fp16_weights)
        layer.weight = int8.to(weight.device)
        layer.state.reset_grads()
    else:
        weight.copy_((dense.T if is_conv1d(module) else dense).to(weight.dtype))


def resolve_targets(model: nn.Module, config: LoTRConfig) -> list[str]:
    """Names of the modules to adapt, in model order.

    As in PEFT, a module of ``modules_to_save`` (the user's, and the head ``task_type`` adds:
    :data:`tensorlotr.adapter.groups.TASK_MODULES_TO_SAVE`) or inside one is never a target,
    and ``"all-linear"`` leaves out the output head. Raises ``ValueError`` when nothing matches
    (listing close names) or when a matched module is not an ``nn.Linear`` or ``Conv1D``.

    Examples
    --------
    >>> from transformers import BertConfig, BertForSequenceClassification
    >>> bert = BertForSequenceClassification(BertConfig(
    ...     vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48
    ... ))
    >>> names = resolve_targets(bert, LoTRConfig(target_modules="all-linear", modules_to_save=["classifier"]))
    >>> "classifier" in names, len(names)  # the head is trained in full, not adapted
    (False, 7)
    """
    patterns = config.target_modules
    if patterns is None and isinstance(config.groups, dict):
        patterns = [p for group in config.groups.values() for p in group]
    if patterns is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in DEFAULT_TARGETS:
            raise ValueError(f"target_modules is required for model type {model_type!r}")
        patterns = DEFAULT_TARGETS[model_type]
    # a layer that already carries an adapter (add_adapter) counts as the layer it wraps
    modules = {n: unwrap(m) for n, m in model.named_modules() if not _inside_adapter_layer(model, n)}
    all_linear = isinstance(patterns, str) and patterns.lower() == ALL_LINEAR
    candidates = [n for n, m in modules.items() if n and (is_supported(m) or not all_linear)]
    saved = saved_patterns(config.modules_to_save, config.task_type)
    names = []
    for name in select_modules(
        candidates, patterns, exclude_modules=config.exclude_modules, layers_to_transform=config.layers_to_transform,
        layers_pattern=config.layers_pattern, heads=_output_heads(model, config.task_type), modules_to_save=saved,
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
        unsaved = select_modules(
            candidates, patterns, exclude_modules=config.exclude_modules,
            layers_to_transform=config.layers_to_transform, layers_pattern=config.layers_pattern,
        )  # fmt: skip
        if saved and any(is_supported(modules[n]) for n in unsaved):
            raise ValueError(
                f"target_modules {patterns!r} match only modules of modules_to_save {saved}, which are trained in "
                "full and never adapted (as in PEFT); target other modules"
            )
        raise ValueError(_no_match_message(model, patterns, config.layers_to_transform))
    return names


def saved_patterns(modules_to_save: list[str] | None, task_type: str | None) -> list[str]:
    """``modules_to_save`` and the head PEFT's model for ``task_type`` adds to it (``classifier``, ``score``, …).

    Examples
    --------
    >>> saved_patterns(["pooler"], "SEQ_CLS")
    ['pooler', 'classifier', 'score']
    >>> saved_patterns(None, "CAUSAL_LM")
    []
    """
    listed = list(modules_to_save or [])
    return listed + [m for m in TASK_MODULES_TO_SAVE.get(task_type or "", ()) if m not in listed]


def _output_heads(model: nn.Module, task_type: str | None) -> list[str]:
    """Module paths that ``"all-linear"`` leaves out: the output embeddings and, for SEQ_CLS, the classifier."""
    get_output = getattr(model, "get_output_embeddings", None)
    output = get_output() if callable(get_output) else None
    heads = [name for name, module in model.named_modules() if output is not None and module is output]
    if task_type == "SEQ_CLS":
        heads += [name for name in SEQ_CLS_HEADS if isinstance(getattr(model, name, None), nn.Module)]
    return heads


def _no_match_message(model: nn.Module, patterns: str | list[str], layers: int | list[int] | None) -> str:
    adaptable = [name for name, module in model.named_modules() if name and is_supported(module)]
    what = "nn.Linear or Conv1D module" + (f" in layers {layers}" if layers is not None else "")
    return no_match_message(patterns, adaptable, what)


def unwrap(module: nn.Module) -> nn.Module:
    """The layer a LoTR layer wraps (its ``base_layer``), or ``module`` itself."""
    base = getattr(module, "base_layer", None) if getattr(module, "is_lotr_layer", False) else None
    return base if isinstance(base, nn.Module) else module


def _inside_adapter_layer(model: nn.Module, name: str) -> bool:
    """True for a submodule of a LoTR layer (its base layer, dropout): the layer stands for them."""
    parent = name.rpartition(".")[0]
    while parent:
        if getattr(model.get_submodule(parent), "is_lotr_layer", False):
            return True
        parent = parent.rpartition(".")[0]
    return False


def build_groups(model: nn.Module, names: list[str], config: LoTRConfig) -> list[Group]:
    """Stack the target modules ``names`` of ``model`` into groups as ``config.groups`` says."""
    modules = dict(model.named_modules())
    return group_modules({name: weight_shape(unwrap(modules[name])) for name in names}, config.groups)


def resolve_modules_to_save(model: nn.Module, patterns: list[str] | None, task_type: str | None = None) -> list[str]:
    """Names of the modules listed in ``modules_to_save`` (outermost matches only), with ``task_type``'s head.

    As PEFT's task models do, ``task_type`` adds its head (``"SEQ_CLS"`` and ``"TOKEN_CLS"``:
    ``classifier`` and ``score``; ``"QUESTION_ANS"``: ``qa_outputs``), wrapped where the model
    has it: a head name that matches nothing is no error, listed or not (a PEFT config of a
    ``SEQ_CLS`` LoRA lists both). Any other name that matches nothing raises ``ValueError``.

    Examples
    --------
    >>> from transformers import BertConfig, BertForSequenceClassification
    >>> bert = BertForSequenceClassification(BertConfig(
    ...     vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48
    ... ))
    >>> default = resolve_modules_to_save(bert, None, "SEQ_CLS")
    >>> default, resolve_modules_to_save(bert, ["classifier", "score"], "SEQ_CLS")
    (['classifier'], ['classifier'])
    >>> resolve_modules_to_save(bert, ["score"])
    Traceback (most recent call last):
    ...
    ValueError: modules_to_save ['score'] match no module of the model
    """
    optional = TASK_MODULES_TO_SAVE.get(task_type or "", ())
    wanted = saved_patterns(patterns, task_type)
    if not wanted:
        return []
    found: list[str] = []
    for name, _ in model.named_modules():
        if name and matches(name, wanted) and not any(name.startswith(f + ".") for f in found):
            found.append(name)
    missing = [p for p in wanted if p not in optional and not any(matches(n, [p]) for n in found)]
    if missing:
        raise ValueError(f"modules_to_save {missing} match no module of the model")
    return found
