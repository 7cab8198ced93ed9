"""The math core: Tucker-2 tensors of matrix stacks, on any tensorly backend.

It knows nothing of torch modules or file formats.
"""

from .error import relative_error, relative_error_lowrank
from .hosvd import tucker2, tucker2_lowrank
from .tensor import Tucker2

__all__ = ["Tucker2", "relative_error", "relative_error_lowrank", "tucker2", "tucker2_lowrank"]
