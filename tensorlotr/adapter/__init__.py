"""What an adapter is: its config, the rules that group modules into stacks, its tensors, and a LoRA's conversion to it.

Independent of torch modules and of files; :mod:`tensorlotr.io` writes it and
:mod:`tensorlotr.nn` attaches it to models.
"""

from .config import DEFAULT_TARGETS, LoTRConfig
from .groups import Group, group_modules, layer_index, layer_pattern, matches, module_order
from .layout import AdapterBuilder, GroupLayout, LoTRAdapterFiles, core_key, factor_key, saved_key
from .lora import LoRAConversion, LoRAFactors, LoRALayers, lora_to_lotr

__all__ = [
    "DEFAULT_TARGETS",
    "AdapterBuilder",
    "Group",
    "GroupLayout",
    "LoRAConversion",
    "LoRAFactors",
    "LoRALayers",
    "LoTRAdapterFiles",
    "LoTRConfig",
    "core_key",
    "factor_key",
    "group_modules",
    "layer_index",
    "layer_pattern",
    "lora_to_lotr",
    "matches",
    "module_order",
    "saved_key",
]
