"""End-to-end ``tensorlotr convert`` on synthetic PEFT checkpoints.

    python bench/convert_bench.py [--workdir DIR]

1. Llama-2-7B shape: 32 layers; q/k/v/o 4096x4096, gate/up 4096->11008, down 11008->4096;
   LoRA r=16, float32, in PEFT's format. Time and peak RSS of the CLI (a child process),
   against the checkpoint size.
2. RoBERTa-base shape (12 layers, query/value 768x768, r=8): the same CLI against the dense
   route, materialising every dW and running tensorly's partial_tucker (HOSVD) per group.
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
from _util import PEAK_RSS_SOURCE, machine

LLAMA = {
    "q_proj": (4096, 4096),
    "k_proj": (4096, 4096),
    "v_proj": (4096, 4096),
    "o_proj": (4096, 4096),
    "gate_proj": (11008, 4096),
    "up_proj": (11008, 4096),
    "down_proj": (4096, 11008),
}
ROBERTA = {"query": (768, 768), "value": (768, 768)}


def write_peft(folder: Path, modules: dict[str, tuple[int, int]], n_layers: int, r: int, path: str) -> int:
    """A synthetic PEFT LoRA folder; returns the size of the weights file in bytes."""
    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for layer in range(n_layers):
        for name, (d_out, d_in) in modules.items():
            prefix = f"base_model.model.{path.format(layer=layer, name=name)}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(r, d_in, generator=generator) / d_in**0.5
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(d_out, r, generator=generator) / r**0.5
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": list(modules), "use_rslora": False}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return (folder / "adapter_model.safetensors").stat().st_size


CLI_WITH_PEAK = (
    PEAK_RSS_SOURCE
    + "import sys\nfrom tensorlotr.cli import main\nrc = main(sys.argv[1:])\n"
    + "print(f'PEAK_RSS_MIB {peak_rss_mib()}', file=sys.stderr)\nsys.exit(rc)\n"
)


def run_cli(args: list[str]) -> tuple[float, float, dict]:
    """Wall time, peak RSS (MiB, VmHWM) and JSON report of ``tensorlotr ARGS --json`` in a child process."""
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", CLI_WITH_PEAK, *args, "--json"], capture_output=True, text=True, check=True
    )
    seconds = time.perf_counter() - start
    peak = float(done.stderr.rsplit("PEAK_RSS_MIB", 1)[1])
    return seconds, peak, json.loads(done.stdout)


def dense_route(folder: Path, n_layers: int, rank: int) -> tuple[float, float]:
    """Materialise dW per group and run tensorly's partial_tucker; returns (seconds, relative error)."""
    import numpy as np
    from safetensors.torch import load_file
    from tensorly.decomposition import partial_tucker

    import tensorlotr as tlr

    start = time.perf_counter()
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    config = json.loads((folder / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    err_sq = ref_sq = 0.0
    for name in ROBERTA:
        stack = np.stack(
            [
                scale
                * (
                    tensors[f"base_model.model.roberta.encoder.layer.{i}.attention.self.{name}.lora_B.weight"]
                    @ tensors[f"base_model.model.roberta.encoder.layer.{i}.attention.self.{name}.lora_A.weight"]
                ).numpy()
                for i in range(n_layers)
            ]
        )
        (core, factors), _ = partial_tucker(stack, rank=[rank, rank], modes=[1, 2], n_iter_max=0)
        err = tlr.relative_error(tlr.Tucker2(core, *factors), stack)
        err_sq += err**2 * float((stack**2).sum())
        ref_sq += float((stack**2).sum())
    return time.perf_counter() - start, (err_sq / ref_sq) ** 0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, help="where to write the synthetic checkpoints (default: a temp dir)")
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="tensorlotr-bench-"))
    print(f"Machine: {machine()}, torch {torch.__version__}\n")
    try:
        # warm the file cache and the interpreter's imports once
        subprocess.run([sys.executable, "-m", "tensorlotr", "--version"], check=True, capture_output=True)
        size = write_peft(work / "llama", LLAMA, 32, 16, "model.layers.{layer}.proj.{name}")
        rows = []
        for flags in (["--rank", "64"], ["--energy", "0.5"]):
            shutil.rmtree(work / "llama-lotr", ignore_errors=True)
            seconds, peak, report = run_cli(["convert", str(work / "llama"), str(work / "llama-lotr"), *flags])
            rows.append((" ".join(flags), seconds, peak, report))
        print(f"Llama-2-7B shape, r=16: checkpoint {size / 2**20:.0f} MiB, 224 modules in 7 groups\n")
        print("| flags | seconds | peak RSS (MiB) | RSS / checkpoint | LoRA params | LoTR params | relative error |")
        print("|---|---|---|---|---|---|---|")
        for flags, seconds, peak, report in rows:
            totals = report["totals"]
            print(
                f"| `{flags}` | {seconds:.2f} | {peak:.0f} | {peak * 2**20 / size:.2f} | {totals['lora_params']:,} "
                f"| {totals['lotr_params']:,} | {totals['relative_error']:.4f} |"
            )
        code = PEAK_RSS_SOURCE + "import tensorlotr.cli, tensorlotr.jobs.convert\nprint(peak_rss_mib())"
        baseline = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        print(f"\nRSS of the interpreter with tensorlotr imported, before any work: {float(baseline.stdout):.0f} MiB")

        write_peft(work / "roberta", ROBERTA, 12, 8, "roberta.encoder.layer.{layer}.attention.self.{name}")
        print("\nRoBERTa-base shape (12 layers, query/value 768x768, r=8), Tucker rank 32:\n")
        print("| route | seconds | relative error |")
        print("|---|---|---|")
        seconds, _, report = run_cli(["convert", str(work / "roberta"), str(work / "roberta-lotr"), "--rank", "32"])
        internal = report["seconds"]
        print(
            f"| `tensorlotr convert` (CLI, whole process) | {seconds:.2f} | {report['totals']['relative_error']:.6f} |"
        )
        print(f"| `convert_lora` inside it | {internal:.3f} | |")
        dense_seconds, dense_err = dense_route(work / "roberta", 12, 32)
        print(f"| dense dW + tensorly partial_tucker | {dense_seconds:.2f} | {dense_err:.6f} |")
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
