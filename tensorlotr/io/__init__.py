"""File formats: LoTR adapter folders, PEFT LoRA folders, checkpoints, zoo folders, model cards, text data."""

from ..adapter.layout import GroupLayout, LoTRAdapterFiles
from ..files.atomic import atomic_dir, atomic_file
from .lotr_format import is_lotr_dir, read_adapter, write_adapter

__all__ = [
    "GroupLayout",
    "LoTRAdapterFiles",
    "atomic_dir",
    "atomic_file",
    "is_lotr_dir",
    "read_adapter",
    "write_adapter",
]
