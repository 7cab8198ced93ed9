"""tensorlotr: low-tensor-rank (LoTR) adapters, a Tucker-2 of a stack of weight updates.

dW_l = U @ G_l @ V.T with U and V shared by all layers of the stack.
"""

from ._version import __version__
from .core import Tucker2, relative_error, relative_error_lowrank, tucker2, tucker2_lowrank

__all__ = [
    "Tucker2",
    "__version__",
    "relative_error",
    "relative_error_lowrank",
    "tucker2",
    "tucker2_lowrank",
]
