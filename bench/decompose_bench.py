"""Streaming decomposition of Llama-shaped fine-tuned pairs, against the read-only floors.

    python bench/decompose_bench.py [--workdir DIR] [--layers 32] [--dim 4096] [--rank 32] [--rounds 2] [--threads N]
    python bench/decompose_bench.py --scaling [--rounds 1] [--threads N]

Builds a synthetic pair in safetensors, bf16 on disk, sharded by 8 layers: L layers of q_proj
and v_proj at d x d (the fine-tuned model is the base plus a planted Tucker-2 update of rank
16 and small noise). With a warm page cache it measures:

- the read-only floors: reading every byte of both checkpoints, and loading every tensor of
  both as float32 in a fresh process (what any consumer of bf16 weights does);
- ``tensorlotr decompose … --target-modules q_proj,v_proj --rank R`` in a child process, with
  1 and 0 power iterations: its wall time, the job's own time (without starting Python and
  importing torch), peak RSS (VmHWM), passes and error. Each of ``--rounds`` runs follows a
  float32-floor measurement, and the fastest run and floor are reported.

``--scaling`` runs the default settings at 1B (16 x 2048), 7B (32 x 4096) and 13B
(40 x 5120) shapes, one at a time, deleting each pair after its run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import PEAK_RSS_SOURCE, machine, run_isolated

CLI_WITH_PEAK = (
    PEAK_RSS_SOURCE
    + "import sys\nfrom tensorlotr.cli import main\nrc = main(sys.argv[1:])\n"
    + "print(f'PEAK_RSS_MIB {peak_rss_mib()}', file=sys.stderr)\nsys.exit(rc)\n"
)


#: Llama-like shapes for the scaling table: layers and d of the square q_proj and v_proj.
SHAPES = {"1B": (16, 2048), "7B": (32, 4096), "13B": (40, 5120)}
SHARD_LAYERS = 8  # layers per safetensors shard, so that writing one holds ~1 GiB at 13B shape


def write_pair(work: Path, n_layers: int, d: int) -> int:
    """Write base and fine-tuned checkpoints (bf16, sharded); return their total bytes.

    One model at a time: the generator's whole sequence is replayed for each, so the data
    are the same as when both were built together, with half the memory.
    """
    size = 0
    for name in ("base", "ft"):
        generator = torch.Generator().manual_seed(0)
        factors = {
            proj: tuple(torch.linalg.qr(torch.randn(d, 16, generator=generator))[0] for _ in range(2))
            for proj in ("q_proj", "v_proj")
        }
        (work / name).mkdir()
        shards = [range(first, min(first + SHARD_LAYERS, n_layers)) for first in range(0, n_layers, SHARD_LAYERS)]
        weight_map = {}
        for number, layers in enumerate(shards, 1):
            tensors = {}
            for layer in layers:
                for proj, (u, v) in factors.items():
                    key = f"model.layers.{layer}.self_attn.{proj}.weight"
                    weight = torch.randn(d, d, generator=generator) * 0.02
                    update = 0.1 * (u @ torch.randn(16, 16, generator=generator) @ v.T)
                    noise = 1e-4 * torch.randn(d, d, generator=generator)
                    tensors[key] = (weight if name == "base" else weight + update + noise).bfloat16()
            file = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
            save_file(tensors, str(work / name / file))
            weight_map.update(dict.fromkeys(tensors, file))
            size += (work / name / file).stat().st_size
        index = {"metadata": {}, "weight_map": weight_map}
        (work / name / "model.safetensors.index.json").write_text(json.dumps(index))
        (work / name / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return size


def _files(work: Path) -> list[Path]:
    return sorted((work / "base").glob("*.safetensors")) + sorted((work / "ft").glob("*.safetensors"))


def read_floor(work: Path) -> float:
    """Seconds to read every byte of both checkpoints (1 MiB chunks)."""
    buffer = bytearray(1 << 20)
    start = time.perf_counter()
    for path in _files(work):
        with open(path, "rb", buffering=0) as handle:
            while handle.readinto(buffer):
                pass
    return time.perf_counter() - start


FLOOR_CODE = """
import json, time, torch
from safetensors import safe_open
torch.set_num_threads({threads})
start = time.perf_counter()
for path in {files!r}:
    with safe_open(path, framework="pt") as handle:
        for key in handle.keys():
            handle.get_tensor(key).to(torch.float32)
print(json.dumps({{"seconds": time.perf_counter() - start}}))
"""


def tensor_floor(work: Path) -> float:
    """Seconds to load every tensor of both checkpoints as float32, one at a time, in a fresh process.

    A fresh process, as the decomposition runs in: the loop's cost depends on the allocator's
    state (each 64 MiB float32 tensor is a new mapping whose pages fault in), and in a process
    that has already freed large tensors the same loop was measured ten times faster.
    """
    files = [str(path) for path in _files(work)]
    return run_isolated(FLOOR_CODE.format(threads=torch.get_num_threads(), files=files))["seconds"]


def run(work: Path, rank: int, power: int) -> tuple[float, float, dict]:
    out = work / f"out-{power}"
    args = [str(work / "base"), str(work / "ft"), str(out), "--target-modules", "q_proj,v_proj"]
    start = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}  # as many threads as the floors use
    done = subprocess.run(
        [sys.executable, "-c", CLI_WITH_PEAK, "decompose", *args, "--rank", str(rank), "--power-iters", str(power),
         "--json"], capture_output=True, text=True, check=True, env=env,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    shutil.rmtree(out, ignore_errors=True)
    return seconds, float(done.stderr.rsplit("PEAK_RSS_MIB", 1)[1]), json.loads(done.stdout)


def measure(work: Path, rank: int, power: int, rounds: int) -> dict:
    """The best of ``rounds`` runs, each after a float32-floor measurement (so both see the same load)."""
    best: dict = {}
    for _ in range(rounds):
        floor32 = tensor_floor(work)
        seconds, peak, report = run(work, rank, power)
        if not best or seconds < best["seconds"]:
            best = {"seconds": seconds, "floor32": floor32, "peak": peak, "report": report}
        best["floor32"] = min(best["floor32"], floor32)
    return best


def main_table(work: Path, n_layers: int, dim: int, rank: int, rounds: int) -> None:
    if not (work / "base").exists():  # a --workdir from an earlier run keeps its pair
        write_pair(work, n_layers, dim)
    size = sum(path.stat().st_size for path in _files(work))
    read_floor(work)  # warm the page cache
    floor = min(read_floor(work) for _ in range(2))
    stack_gib = n_layers * dim**2 * 4 / 2**30
    print(
        f"{n_layers} layers x q_proj, v_proj at {dim}x{dim}, bf16: {size / 2**30:.2f} GiB on disk "
        f"(both models); stack per group in float32: {stack_gib:.2f} GiB\n"
    )
    print(f"read-only floor, every byte of both checkpoints (page cache warm): {floor:.2f} s\n")
    print(
        "| run | CLI seconds | job seconds | float32 floor (s) | CLI x float32 floor | job x float32 floor "
        "| peak RSS (MiB) | passes per group | relative error |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for power in (1, 0):
        m = measure(work, rank, power, rounds)
        job = m["report"]["seconds"]
        print(
            f"| `--rank {rank} --power-iters {power}` | {m['seconds']:.1f} | {job:.1f} | {m['floor32']:.2f} "
            f"| {m['seconds'] / m['floor32']:.1f} | {job / m['floor32']:.1f} | {m['peak']:.0f} "
            f"| {m['report']['groups'][0]['passes']} | {m['report']['totals']['relative_error']:.4f} |"
        )


def scaling_table(work: Path, rank: int, rounds: int) -> None:
    print(f"Default settings (`--rank {rank}`, one power iteration); each shape written, measured and deleted\n")
    print(
        "| shape | layers x d | on disk (GiB) | read (GiB) | float32 floor (s) | CLI seconds | job seconds "
        "| job x float32 floor | job seconds per GiB read | peak RSS (MiB) | relative error |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for label, (n_layers, dim) in SHAPES.items():
        folder = work / label
        folder.mkdir()
        try:
            size = write_pair(folder, n_layers, dim) / 2**30
            read_floor(folder)  # warm the page cache
            m = measure(folder, rank, 1, rounds)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        job, passes = m["report"]["seconds"], m["report"]["groups"][0]["passes"]
        print(
            f"| {label} | {n_layers} x {dim} | {size:.2f} | {size * passes:.2f} | {m['floor32']:.2f} "
            f"| {m['seconds']:.1f} | {job:.1f} | {job / m['floor32']:.1f} | {job / (size * passes):.2f} "
            f"| {m['peak']:.0f} | {m['report']['totals']['relative_error']:.4f} |",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2, help="runs per setting; the fastest is reported")
    parser.add_argument("--scaling", action="store_true", help="the 1B, 7B and 13B shapes instead of the main table")
    parser.add_argument("--threads", type=int, help="torch threads for the floors and the runs (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="tensorlotr-decompose-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"Machine: {machine()}, torch {torch.__version__}, {torch.get_num_threads()} torch threads\n", flush=True)
    try:
        if args.scaling:
            scaling_table(work, args.rank, args.rounds)
        else:
            main_table(work, args.layers, args.dim, args.rank, args.rounds)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
