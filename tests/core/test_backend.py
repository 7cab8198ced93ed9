"""Backend selection (core/backend.py): tensorly's backend is restored and results keep their inputs' backend."""

from __future__ import annotations

import tensorly as tl
import torch

import tensorlotr as tlr


def test_backend_is_restored_and_output_backend_matches():
    assert tl.get_backend() == "numpy"
    t = tlr.tucker2_lowrank(torch.randn(2, 5, 2), torch.randn(2, 2, 4), 2)
    assert isinstance(t.core, torch.Tensor) and t.core.dtype == torch.float32
    assert tl.get_backend() == "numpy"
    h = tlr.tucker2_lowrank(torch.randn(2, 5, 2, dtype=torch.bfloat16), torch.randn(2, 2, 4, dtype=torch.bfloat16), 2)
    assert h.core.dtype == torch.float32  # half precision is computed in float32
