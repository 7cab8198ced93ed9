"""tensorlotr: low-tensor-rank (LoTR) adapters, a Tucker-2 of a stack of weight updates.

dW_l = U @ G_l @ V.T with U and V shared by all layers of the stack: a stack of L updates
(L, d_out, d_in) is held as U (d_out, r_out), V (d_in, r_in) and L cores G_l (r_out, r_in).

Examples
--------
>>> import numpy as np
>>> import tensorlotr as tlr
>>> B = np.random.default_rng(0).standard_normal((12, 768, 8))  # LoRA up-projections, (L, d_out, r)
>>> A = np.random.default_rng(1).standard_normal((12, 8, 768))  # LoRA down-projections, (L, r, d_in)
>>> exact = tlr.tucker2_lowrank(B, A, scale=2.0)  # the exact rank: at most sum_l r_l = 96
>>> exact.rank, tlr.relative_error_lowrank(exact, B, A, scale=2.0) < 1e-12
((96, 96), True)
>>> tucker = tlr.tucker2_lowrank(B, A, rank=32, scale=2.0)  # never forms a 768 x 768 matrix
>>> tucker.core.shape, tucker.out_factor.shape, tucker.in_factor.shape
((12, 32, 32), (768, 32), (768, 32))
>>> tucker.n_params == 32 * 768 + 32 * 768 + 12 * 32 * 32
True
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
