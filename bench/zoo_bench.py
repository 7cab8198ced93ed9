"""Benchmarks of the LoRA zoo. Prints markdown tables.

    python bench/zoo_bench.py compress [--adapters 100] [--kind random|planted|both] [--route new|old|both]
        [--workdir DIR]
    python bench/zoo_bench.py serve [--adapters 100] [--batch 64] [--seq 32]

1. ``compress``: N synthetic PEFT LoRAs at Llama-2-7B shapes (32 layers; q, k, v, o 4096x4096;
   r=16; bf16 files), random and with planted shared structure (each update is
   ``U0 C V0^T`` with ``U0``, ``V0`` of rank 64 shared by every adapter and layer, plus 1%
   noise). ``tensorlotr zoo compress --rank 64`` in a child process: time, peak RSS, storage
   against the N separate LoRAs, and each adapter's relative error. ``--route`` picks the fit:
   ``new`` the randomized range finder of the factored stack read in batches (the default of
   ``zoo compress``), ``old`` the exact HOSVD of the factored stack in memory
   (``Objective(method="exact")``, set in the child), ``both`` side by side on the same files.
2. ``serve``: mixed batches of sequences drawn from N adapters on the packaged MiniLM (CPU):
   throughput of the zoo's mixed-batch forward against (a) the same batch through one adapter
   and (b) PEFT LoRA serving the same N adapters in mixed batches (``adapter_names``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import PEAK_RSS_SOURCE, machine

LLAMA_ATTENTION = {"q_proj": (4096, 4096), "k_proj": (4096, 4096), "v_proj": (4096, 4096), "o_proj": (4096, 4096)}
PATH = "model.layers.{layer}.self_attn.{name}"


def write_zoo_sources(root: Path, n_adapters: int, planted: bool, n_layers: int = 32, r: int = 16) -> int:
    """N synthetic PEFT LoRA folders in bf16; returns their total size in bytes."""
    generator = torch.Generator().manual_seed(0)
    shared = {
        name: (
            torch.linalg.qr(torch.randn(d_out, 64, generator=generator))[0],
            torch.randn(64, d_in, generator=generator),
        )
        for name, (d_out, d_in) in LLAMA_ATTENTION.items()
    }
    total = 0
    for a in range(n_adapters):
        folder = root / f"lora{a:03d}"
        folder.mkdir(parents=True)
        tensors = {}
        for layer in range(n_layers):
            for name, (d_out, d_in) in LLAMA_ATTENTION.items():
                prefix = f"base_model.model.{PATH.format(layer=layer, name=name)}"
                if planted:  # B = U0 C (d_out, r), A = C' V0 (r, d_in): the update lies in the shared spaces
                    u0, v0 = shared[name]
                    b = u0 @ torch.randn(64, r, generator=generator) / 8
                    a_ = torch.randn(r, 64, generator=generator) @ v0 / 8 / d_in**0.5
                    b += 0.01 * b.std() * torch.randn(d_out, r, generator=generator)
                else:
                    b = torch.randn(d_out, r, generator=generator) / r**0.5
                    a_ = torch.randn(r, d_in, generator=generator) / d_in**0.5
                tensors[f"{prefix}.lora_A.weight"] = a_.to(torch.bfloat16)
                tensors[f"{prefix}.lora_B.weight"] = b.to(torch.bfloat16)
        save_file(tensors, str(folder / "adapter_model.safetensors"))
        config = {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": list(LLAMA_ATTENTION)}
        (folder / "adapter_config.json").write_text(json.dumps(config))
        total += (folder / "adapter_model.safetensors").stat().st_size
    return total


#: ``zoo compress`` in a child: argv[1] is the fit method (``Objective.method``), the rest the CLI's arguments.
CLI_WITH_PEAK = (
    PEAK_RSS_SOURCE
    + "import functools, importlib, json, sys\n"
    + "job, fit = (importlib.import_module(f'tensorlotr.jobs.zoo.{m}') for m in ('compress', 'fit'))\n"
    + "job.Objective = functools.partial(fit.Objective, method=sys.argv[1])\n"
    + "from tensorlotr.cli import main\nrc = main(sys.argv[2:])\n"
    + "print(json.dumps({'peak_rss_mib': peak_rss_mib()}), file=sys.stderr)\nsys.exit(rc)\n"
)
#: The zoo's rank, as the CLI takes it.
RANK = ["--rank", "64", "--json"]
#: ``--route`` names and the fit method each runs.
ROUTES = {"new": "randomized", "old": "exact"}


def compress(
    n_adapters: int, workdir: Path, kinds: tuple[bool, ...] = (False, True), routes: tuple[str, ...] = ("new",)
) -> None:
    print(f"Machine: {machine()}, torch {torch.__version__}\n")
    print(f"{n_adapters} LoRAs, Llama-2-7B attention (32 layers, q/k/v/o 4096x4096), r=16, bf16 files; zoo rank 64\n")
    print(
        "| LoRAs | route | seconds | peak RSS (MiB) | separate params | zoo params | smaller "
        "| mean / max rel. error | load avg (1 min) before / after |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for planted in kinds:
        root = workdir / ("planted" if planted else "random")
        write_zoo_sources(root, n_adapters, planted)
        sources = sorted(str(p) for p in root.iterdir())
        means = {}
        for route in routes:
            out = workdir / "zoo"
            load_before = os.getloadavg()[0]
            start = time.perf_counter()
            done = subprocess.run(
                [sys.executable, "-c", CLI_WITH_PEAK, ROUTES[route], "zoo", "compress", *sources, str(out), *RANK],
                capture_output=True,
                text=True,
                check=True,
            )
            seconds = time.perf_counter() - start
            report = json.loads(done.stdout)
            peak = json.loads(done.stderr.strip().splitlines()[-1])["peak_rss_mib"]
            errors = [a["relative_error"] for a in report["adapters"]]
            means[route] = statistics.mean(errors)
            totals = report["totals"]
            print(
                f"| {n_adapters} {'planted' if planted else 'random'} | {route} | {seconds:.1f} | {peak:.0f} | "
                f"{totals['separate_params']:,} | {totals['stored_params']:,} | {totals['compression']:.1f}x | "
                f"{statistics.mean(errors):.6f} / {max(errors):.6f} | {load_before:.1f} / {os.getloadavg()[0]:.1f} |",
                flush=True,
            )
            shutil.rmtree(out)
        if len(means) == 2:
            print(f"\n{'planted' if planted else 'random'}: mean error new / old = {means['new'] / means['old']:.6f}\n")
        shutil.rmtree(root)


def _minilm_loras(root: Path, n_adapters: int, r: int = 8) -> list[Path]:
    """N random PEFT LoRAs (query, value; r=8) of the packaged MiniLM, saved by peft."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    from tensorlotr.demo import default_model_dir

    folders = []
    for a in range(n_adapters):
        torch.manual_seed(a)
        base = AutoModel.from_pretrained(str(default_model_dir()))
        config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["query", "value"], init_lora_weights=False)
        model = get_peft_model(base, config)
        with torch.no_grad():  # PEFT's own non-zero init is tiny; make each adapter matter
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0.0, 0.02)
        folders.append(root / f"lora{a:03d}")
        model.save_pretrained(folders[-1])
    return folders


def _throughput(forward, batches: int = 5) -> float:
    """Sequences per second of ``forward()`` on one batch (median of ``batches`` runs after a warm-up)."""
    forward()
    times = []
    for _ in range(batches):
        start = time.perf_counter()
        n = forward()
        times.append(time.perf_counter() - start)
    return n / statistics.median(times)


def serve(n_adapters: int, batch: int, seq: int, rank: int = 32) -> None:
    from peft import PeftModel
    from transformers import AutoModel

    import tensorlotr as tlr
    from tensorlotr.demo import default_model_dir

    torch.set_num_threads(max(1, torch.get_num_threads()))
    workdir = Path(tempfile.mkdtemp(prefix="zoo-serve-"))
    try:
        folders = _minilm_loras(workdir / "loras", n_adapters)
        report = tlr.compress_zoo(folders, workdir / "zoo", rank=rank)
        names = [a.adapter for a in report.adapters]
        generator = torch.Generator().manual_seed(0)
        input_ids = torch.randint(1000, 20000, (batch, seq), generator=generator)
        mask = torch.ones_like(input_ids)
        mixed = [names[i] for i in torch.randint(0, n_adapters, (batch,), generator=generator).tolist()]

        zoo_model = tlr.LoTRModel.from_pretrained(AutoModel.from_pretrained(str(default_model_dir())), workdir / "zoo")
        zoo_model.eval()
        peft_model = PeftModel.from_pretrained(
            AutoModel.from_pretrained(str(default_model_dir())), str(folders[0]), adapter_name=names[0]
        )
        for name, folder in zip(names[1:], folders[1:], strict=True):
            peft_model.load_adapter(str(folder), adapter_name=name)
        peft_model.eval()

        def run(model, **kwargs):
            with torch.no_grad():
                model(input_ids=input_ids, attention_mask=mask, **kwargs)
            return batch

        zoo_model.set_adapter(names[0])
        rows = {
            "LoTR zoo, one adapter": _throughput(lambda: run(zoo_model)),
            "LoTR zoo, mixed batch": _throughput(lambda: run(zoo_model, adapter_names=mixed)),
        }
        peft_model.set_adapter(names[0])
        rows["PEFT LoRA, one adapter"] = _throughput(lambda: run(peft_model))
        rows["PEFT LoRA, mixed batch"] = _throughput(lambda: run(peft_model, adapter_names=mixed))
        single = rows["LoTR zoo, one adapter"]
        print(f"Machine: {machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads\n")
        print(
            f"MiniLM, {n_adapters} adapters (PEFT LoRA r=8 on query/value; zoo rank {rank}), "
            f"batch {batch} x {seq} tokens, {len(set(mixed))} distinct adapters in the batch\n"
        )
        print("| path | sequences/s | vs LoTR one adapter |")
        print("|---|---|---|")
        for path, value in rows.items():
            print(f"| {path} | {value:.1f} | {value / single:.2f} |")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=["compress", "serve"])
    parser.add_argument("--adapters", type=int, default=100)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--kind", choices=["random", "planted", "both"], default="both", help="compress: which LoRAs")
    parser.add_argument("--route", choices=["new", "old", "both"], default="new", help="compress: which fit")
    args = parser.parse_args()
    if args.part == "compress":
        workdir = args.workdir or Path(tempfile.mkdtemp(prefix="zoo-bench-"))
        try:
            kinds = {"random": (False,), "planted": (True,), "both": (False, True)}[args.kind]
            routes = ("new", "old") if args.route == "both" else (args.route,)
            compress(args.adapters, workdir, kinds, routes)
        finally:
            if args.workdir is None:
                shutil.rmtree(workdir, ignore_errors=True)
    else:
        serve(args.adapters, args.batch, args.seq)


if __name__ == "__main__":
    main()
