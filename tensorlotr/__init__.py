"""tensorlotr: low-tensor-rank (LoTR) adapters, a Tucker-2 of a stack of weight updates.

dW_l = U @ G_l @ V.T with U and V shared by all layers of the stack.
"""

from ._version import __version__
from .convert import convert_lora, export_lora
from .core import Tucker2, relative_error, relative_error_lowrank, tucker2, tucker2_lowrank
from .decomposition import decompose
from .nn import LoTRConfig, LoTRModel, get_lotr_model

__all__ = [
    "LoTRConfig",
    "LoTRModel",
    "LoTRTrainer",
    "Tucker2",
    "__version__",
    "convert_lora",
    "decompose",
    "export_lora",
    "get_lotr_model",
    "relative_error",
    "relative_error_lowrank",
    "tucker2",
    "tucker2_lowrank",
]


def __getattr__(name: str):
    if name == "LoTRTrainer":  # importing transformers.Trainer takes seconds; only on demand
        from .nn.trainer import LoTRTrainer

        return LoTRTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
