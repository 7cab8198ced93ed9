"""tensorlotr: low-tensor-rank (LoTR) adapters, a Tucker-2 of a stack of weight updates.

dW_l = U @ G_l @ V.T with U and V shared by all layers of the stack.
"""

from ._version import __version__
from .adapter import LoTRConfig
from .convert import convert_lora, export_lora
from .core import Tucker2, relative_error, relative_error_lowrank, tucker2, tucker2_lowrank
from .decomposition import decompose
from .zoo import add_to_zoo, compress_zoo

__all__ = [
    "LoTRConfig",
    "LoTRModel",
    "LoTRTrainer",
    "Tucker2",
    "__version__",
    "add_to_zoo",
    "compress_zoo",
    "convert_lora",
    "decompose",
    "export_lora",
    "get_lotr_model",
    "relative_error",
    "relative_error_lowrank",
    "tucker2",
    "tucker2_lowrank",
]


#: Names of the torch bindings, imported on first use so that the file jobs never load them
#: (and ``LoTRTrainer``'s transformers.Trainer import, which takes seconds, happens on demand).
_LAZY = {"LoTRModel": "nn", "get_lotr_model": "nn", "LoTRTrainer": "nn"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
