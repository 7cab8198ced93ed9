"""Benchmark of the Tucker-2 core. Prints a markdown table.

    python bench/tucker_bench.py [--dtypes float32,float64] [--skip-llama] [--ours-only]

1. RoBERTa-base shape (L=12, d=768, LoRA r=8), Tucker ranks 8 and 32, float32 and float64:
   tucker2_lowrank against tensorly's partial_tucker on the dense stack, side by side in
   one process, on the numpy and pytorch backends.
2. Llama-2-7B shape (L=32, d=4096, LoRA r=16), Tucker rank 64: time and peak RSS of
   tucker2_lowrank, each backend in a fresh process.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

import numpy as np
from tensorly.decomposition import partial_tucker

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import PEAK_RSS_SOURCE, interleaved, machine, run_isolated

import tensorlotr as tlr


def lora_stack(n_layers: int, d: int, r: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    B = (rng.standard_normal((n_layers, d, r)) / np.sqrt(d)).astype(np.float32)
    A = (rng.standard_normal((n_layers, r, d)) / np.sqrt(d)).astype(np.float32)
    return B, A


def roberta_rows(dtypes: tuple[str, ...]) -> list[str]:
    import tensorly as tl
    import torch

    rows = []
    for dtype, backend in ((dtype, backend) for dtype in dtypes for backend in ("numpy", "pytorch")):
        B_np, A_np = (x.astype(dtype) for x in lora_stack(12, 768, 8))
        B, A = (torch.from_numpy(B_np), torch.from_numpy(A_np)) if backend == "pytorch" else (B_np, A_np)
        X = np.einsum("lmr,lrn->lmn", B_np, A_np)
        X = torch.from_numpy(X) if backend == "pytorch" else X
        for rank in (8, 32):
            for label, n_iter in (("HOSVD", 0), ("HOOI, 10 sweeps", 10)):

                def ours(B=B, A=A, rank=rank, n_iter=n_iter):
                    return tlr.tucker2_lowrank(B, A, rank, n_iter=n_iter)

                def reference(rank=rank, n_iter=n_iter, X=X, backend=backend):
                    with tl.backend_context(backend):
                        (core, factors), _ = partial_tucker(
                            X, rank=[rank, rank], modes=[1, 2], n_iter_max=n_iter, tol=0
                        )
                    return tlr.Tucker2(core, *factors)

                ours()  # warm-up: plan caches, LAPACK workspaces
                (min_ours, med_ours, tucker), (min_ref, med_ref, ref) = interleaved(
                    [ours, reference], calls=[5, 1], rounds=2 if n_iter else 3
                )
                err_ours, err_ref = tlr.relative_error_lowrank(tucker, B, A), tlr.relative_error(ref, X)
                rows.append(
                    f"| {backend} | {dtype} | {rank} | {label} | {min_ours * 1e3:.1f} / {med_ours * 1e3:.1f} "
                    f"| {min_ref * 1e3:.0f} / {med_ref * 1e3:.0f} "
                    f"| {min_ref / min_ours:.0f}x / {med_ref / med_ours:.0f}x "
                    f"| {err_ours:.6f} | {err_ref:.6f} |"
                )
    return rows


def ours_only_rows(dtypes: tuple[str, ...]) -> list[str]:
    """``tucker2_lowrank`` alone at RoBERTa-base shape: the min of 15 calls (5 with HOOI), in ms."""
    import torch

    rows = ["| backend | dtype | Tucker rank | HOSVD (ms) | HOOI, 10 sweeps (ms) |", "|---|---|---|---|---|"]
    for dtype, backend in ((dtype, backend) for dtype in dtypes for backend in ("numpy", "pytorch")):
        B, A = (x.astype(dtype) for x in lora_stack(12, 768, 8))
        B, A = (torch.from_numpy(B), torch.from_numpy(A)) if backend == "pytorch" else (B, A)
        cells = []
        for rank in (8, 32):
            times = []
            for n_iter, calls in ((0, 15), (10, 5)):
                fn = partial(tlr.tucker2_lowrank, B, A, rank, n_iter=n_iter)
                fn()
                times.append(interleaved([fn], calls=[calls], rounds=1)[0][0] * 1e3)
            cells.append(f"| {backend} | {dtype} | {rank} | {times[0]:.2f} | {times[1]:.1f} |")
        rows += cells
    return rows


LLAMA_CODE = (
    PEAK_RSS_SOURCE
    + """
import json, time
import numpy as np
BACKEND = {backend!r}
rng = np.random.default_rng(0)
B = (rng.standard_normal((32, 4096, 16)) / 64).astype(np.float32)
A = (rng.standard_normal((32, 16, 4096)) / 64).astype(np.float32)
if BACKEND == "torch":
    import torch
    B, A = torch.from_numpy(B), torch.from_numpy(A)
from tensorlotr.core import tucker2_lowrank, relative_error_lowrank
tucker2_lowrank(B[:2], A[:2], 8)  # warm up libraries
rss_before = peak_rss_mib()
times = []
for _ in range(3):
    t0 = time.perf_counter(); tucker = tucker2_lowrank(B, A, 64); times.append(time.perf_counter() - t0)
peak = peak_rss_mib()
err = relative_error_lowrank(tucker, B, A)
print(json.dumps(dict(seconds=sorted(times)[1], rss=peak, rss_before=rss_before, error=err)))
"""
)


def llama_rows() -> list[str]:
    rows = []
    for backend in ("numpy", "torch"):
        res = run_isolated(LLAMA_CODE.format(backend=backend))
        rows.append(
            f"| {backend} | {res['seconds']:.2f} | {res['rss']:.0f} | {res['rss'] - res['rss_before']:.0f} "
            f"| {res['error']:.4f} |"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", default="float32,float64", help="comma-separated dtypes of the RoBERTa rows")
    parser.add_argument("--skip-llama", action="store_true", help="only the RoBERTa-shape rows")
    parser.add_argument(
        "--ours-only", action="store_true", help="only tucker2_lowrank's times (min of 15), e.g. to compare commits"
    )
    args = parser.parse_args()
    print(f"Machine: {machine()}\n")
    if args.ours_only:
        print("\n".join(ours_only_rows(tuple(args.dtypes.split(",")))))
        return
    print(
        "RoBERTa-base shape: L=12, d=768, LoRA r=8; times in ms, min / median, run side by side: per round 5 calls "
        "of ours and 1 of tensorly's, 3 rounds (2 for HOOI)\n"
    )
    print(
        "| backend | dtype | Tucker rank | algorithm | tucker2_lowrank (ms) | partial_tucker, dense (ms) "
        "| speed-up | error (ours) | error (tensorly) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(roberta_rows(tuple(args.dtypes.split(",")))))
    if args.skip_llama:
        return
    print("\nLlama-2-7B shape: L=32, d=4096, LoRA r=16, Tucker rank 64, float32, fresh process per backend\n")
    print("| backend | seconds | peak RSS (MiB) | RSS added by the run (MiB) | relative error |")
    print("|---|---|---|---|---|")
    print("\n".join(llama_rows()))


if __name__ == "__main__":
    main()
