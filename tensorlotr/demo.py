"""The main job, run by ``make demo``."""

from __future__ import annotations

import time

import numpy as np

from .core import relative_error_lowrank, tucker2_lowrank
from .report import format_table


def run_core_demo(seed: int = 0) -> str:
    """Decompose a LoRA-shaped stack (RoBERTa-base query projections, r=8) at several ranks."""
    rng = np.random.default_rng(seed)
    n_layers, d, lora_rank = 12, 768, 8
    B = rng.standard_normal((n_layers, d, lora_rank)) / np.sqrt(d)
    A = rng.standard_normal((n_layers, lora_rank, d)) / np.sqrt(d)
    rows = []
    for rank in (8, 16, 32, 64, 96):
        start = time.perf_counter()
        tucker = tucker2_lowrank(B, A, rank)
        seconds = time.perf_counter() - start
        rows.append(
            {
                "rank": tucker.rank,
                "LoRA params": n_layers * lora_rank * 2 * d,
                "LoTR params": tucker.n_params,
                "rel. error": relative_error_lowrank(tucker, B, A),
                "seconds": seconds,
            }
        )
    header = f"LoRA stack: L={n_layers}, d_out=d_in={d}, r={lora_rank}; Tucker-2 by tucker2_lowrank"
    return header + "\n" + format_table(rows)
