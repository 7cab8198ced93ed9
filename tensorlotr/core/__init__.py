"""The math core: Tucker-2 tensors of matrix stacks, on any tensorly backend.

It knows nothing of torch modules or file formats. This module is its whole public
surface: code outside ``tensorlotr.core`` imports from here only.

Modules, each importing only those above it: ``backend`` (no core imports), ``contract``,
``svd`` (rank choice, singular vectors, HOOI, the dense HOSVD on arrays),
``lowrank`` (LoRA-factored stacks), ``tensor`` (``Tucker2``), ``hosvd`` (``tucker2``,
``tucker2_lowrank``), ``error``, ``range_finder`` (``FactoredStack``: a randomized Tucker-2 of
LoRA factors read in batches of layers) and ``streaming`` (stacks read one layer at a time), ``weighted``
(the output-aware Tucker-2, weighted by the layers' input second moments).
"""

from .backend import check_energy, check_rank, clipped_rank_note, max_rank, normalize_rank
from .contract import contract, plan_cache_info
from .error import relative_error, relative_error_lowrank
from .hosvd import tucker2, tucker2_lowrank
from .lowrank import lowrank_layers, lowrank_norm_sq
from .range_finder import FactoredFit, FactoredStack
from .streaming import LayerStack, tucker2_streaming
from .svd import choose_rank
from .tensor import Tucker2
from .weighted import tucker2_weighted, weighted_error_lowrank, weighted_residuals_lowrank

__all__ = [
    "FactoredFit",
    "FactoredStack",
    "LayerStack",
    "Tucker2",
    "check_energy",
    "check_rank",
    "choose_rank",
    "clipped_rank_note",
    "contract",
    "lowrank_layers",
    "lowrank_norm_sq",
    "max_rank",
    "normalize_rank",
    "plan_cache_info",
    "relative_error",
    "relative_error_lowrank",
    "tucker2",
    "tucker2_lowrank",
    "tucker2_streaming",
    "tucker2_weighted",
    "weighted_error_lowrank",
    "weighted_residuals_lowrank",
]
