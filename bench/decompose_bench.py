"""Streaming decomposition of a Llama-shaped fine-tuned pair, against the read-only floor.

    python bench/decompose_bench.py [--workdir DIR] [--layers 32] [--rank 32]

Builds a synthetic pair in safetensors, bf16 on disk: 32 layers of q_proj and v_proj at
4096x4096 (the fine-tuned model is the base plus a planted Tucker-2 update of rank 16 and
small noise). Measures, after one warm-up read so both runs see the page cache:

- the read-only floor: reading every byte of both checkpoints;
- ``tensorlotr decompose … --target-modules q_proj,v_proj --rank R`` in a child process,
  with 1 and 0 power iterations: time and peak RSS (VmHWM).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import PEAK_RSS_SOURCE, machine

CLI_WITH_PEAK = (
    PEAK_RSS_SOURCE
    + "import sys\nfrom tensorlotr.cli import main\nrc = main(sys.argv[1:])\n"
    + "print(f'PEAK_RSS_MIB {peak_rss_mib()}', file=sys.stderr)\nsys.exit(rc)\n"
)


def write_pair(work: Path, n_layers: int, d: int) -> int:
    generator = torch.Generator().manual_seed(0)
    factors = {
        name: tuple(torch.linalg.qr(torch.randn(d, 16, generator=generator))[0] for _ in range(2))
        for name in ("q_proj", "v_proj")
    }
    base, finetuned = {}, {}
    for layer in range(n_layers):
        for name, (u, v) in factors.items():
            key = f"model.layers.{layer}.self_attn.{name}.weight"
            weight = torch.randn(d, d, generator=generator) * 0.02
            update = 0.1 * (u @ torch.randn(16, 16, generator=generator) @ v.T)
            base[key] = weight.bfloat16()
            finetuned[key] = (weight + update + 1e-4 * torch.randn(d, d, generator=generator)).bfloat16()
    size = 0
    for name, tensors in (("base", base), ("ft", finetuned)):
        (work / name).mkdir()
        save_file(tensors, str(work / name / "model.safetensors"))
        (work / name / "config.json").write_text(json.dumps({"model_type": "llama"}))
        size += (work / name / "model.safetensors").stat().st_size
    return size


def read_floor(work: Path) -> float:
    """Seconds to read every byte of both checkpoints (1 MiB chunks)."""
    buffer = bytearray(1 << 20)
    start = time.perf_counter()
    for name in ("base", "ft"):
        with open(work / name / "model.safetensors", "rb", buffering=0) as handle:
            while handle.readinto(buffer):
                pass
    return time.perf_counter() - start


def tensor_floor(work: Path) -> float:
    """Seconds to load every tensor of both checkpoints as float32, one at a time."""
    from safetensors import safe_open

    start = time.perf_counter()
    for name in ("base", "ft"):
        with safe_open(str(work / name / "model.safetensors"), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118
                handle.get_tensor(key).to(torch.float32)
    return time.perf_counter() - start


def run(work: Path, rank: int, power: int) -> tuple[float, float, dict]:
    out = work / f"out-{power}"
    args = [str(work / "base"), str(work / "ft"), str(out), "--target-modules", "q_proj,v_proj"]
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", CLI_WITH_PEAK, "decompose", *args, "--rank", str(rank), "--power-iters", str(power),
         "--json"], capture_output=True, text=True, check=True,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    shutil.rmtree(out, ignore_errors=True)
    return seconds, float(done.stderr.rsplit("PEAK_RSS_MIB", 1)[1]), json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--rank", type=int, default=32)
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="tensorlotr-decompose-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        size = write_pair(work, args.layers, args.dim)
        read_floor(work)  # warm the page cache
        floor = min(read_floor(work) for _ in range(2))
        print(f"Machine: {machine()}, torch {torch.__version__}")
        stack_gib = args.layers * args.dim**2 * 4 / 2**30
        print(
            f"{args.layers} layers x q_proj, v_proj at {args.dim}x{args.dim}, bf16: {size / 2**30:.2f} GiB on disk "
            f"(both models); stack per group in float32: {stack_gib:.2f} GiB\n"
        )
        floor32 = min(tensor_floor(work) for _ in range(2))
        print(f"read-only floor, every byte of both checkpoints (page cache warm): {floor:.2f} s")
        print(f"read-only floor, every tensor of both loaded as float32: {floor32:.2f} s\n")
        print("| run | seconds | x byte floor | x float32 floor | peak RSS (MiB) | passes per group | relative error |")
        print("|---|---|---|---|---|---|---|")
        for power in (1, 0):
            seconds, peak, report = run(work, args.rank, power)
            passes = report["groups"][0]["passes"]
            print(
                f"| `--rank {args.rank} --power-iters {power}` | {seconds:.1f} | {seconds / floor:.0f} "
                f"| {seconds / floor32:.1f} | {peak:.0f} "
                f"| {passes} | {report['totals']['relative_error']:.4f} |"
            )
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
