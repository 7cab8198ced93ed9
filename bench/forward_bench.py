"""The unmerged adapter's added cost over the frozen base: LoTR against PEFT LoRA at equal rank.

    HF_HUB_OFFLINE=1 python bench/forward_bench.py [--rank 8] [--rounds 7] [--threads 1]

The packaged all-MiniLM-L6-v2 (384 hidden, 6 layers), adapters on ``query`` and ``value``,
no-grad forwards in eval mode, unmerged. Two shapes: decode (batch 1, one token) and prefill
(batch 32 x 64 tokens). Models: the frozen base; PEFT LoRA; LoTR with one group per target
(``by_name``); LoTR with query and value in one group (``shared``), which computes ``x V`` once
per attention block; and the same shared LoTR with that reuse switched off. Each round times
every model back to back, so a round's added cost is paired with its own base time; the
median over rounds is reported. Times are CPU time of the process (``time.process_time``)
with ``--threads`` torch threads: on a shared machine wall time also counts other jobs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import machine

import tensorlotr as tlr
from tensorlotr.demo import default_model_dir, load_classifier

SHAPES = {"decode (1 x 1)": (1, 1), "prefill (32 x 64)": (32, 64)}
#: forwards per model and round: many for the sub-millisecond decode, few for prefill
REPEATS = {"decode (1 x 1)": 200, "prefill (32 x 64)": 4}


def make_models(rank: int) -> dict[str, torch.nn.Module]:
    from peft import LoraConfig, get_peft_model

    def base() -> torch.nn.Module:
        return load_classifier(default_model_dir(), seed=0)[1]

    def lotr(groups: str) -> tlr.LoTRModel:
        config = tlr.LoTRConfig(rank=rank, alpha=2 * rank, target_modules=["query", "value"], groups=groups)
        model = tlr.get_lotr_model(base(), config)
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():  # trained-looking cores, so no path can skip work on zeros
            for _, layer in model.lotr_layers():
                layer.lotr_core.copy_(torch.randn(layer.lotr_core.shape, generator=generator) * 0.1)
        return model

    lora = get_peft_model(
        base(), LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["query", "value"], init_lora_weights=False)
    )
    unshared = lotr("shared")
    for handle in unshared._sharing_hooks:
        handle.remove()
    models = {
        "base (frozen)": base(),
        "PEFT LoRA": lora,
        "LoTR by_name": lotr("by_name"),
        "LoTR shared": lotr("shared"),
        "LoTR shared, x V not reused": unshared,
    }
    for model in models.values():
        model.eval()
    return models


def per_forward(model: torch.nn.Module, batch: dict[str, torch.Tensor], repeats: int) -> float:
    """Mean CPU seconds per no-grad forward over ``repeats`` calls."""
    with torch.no_grad():
        start = time.process_time()
        for _ in range(repeats):
            model(**batch)
        return (time.process_time() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    models = make_models(args.rank)
    base = models["base (frozen)"]
    print(f"Machine: {machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"MiniLM-L6 (384 hidden, 6 layers), rank {args.rank}, targets query+value, unmerged, no grad, eval mode\n")
    for shape, (batch_size, length) in SHAPES.items():
        batch = {
            "input_ids": torch.randint(1000, 20000, (batch_size, length)),
            "attention_mask": torch.ones(batch_size, length, dtype=torch.long),
        }
        repeats = REPEATS[shape]
        for model in models.values():
            per_forward(model, batch, max(1, repeats // 4))  # warm-up
        totals: dict[str, list[float]] = {name: [] for name in models}
        added: dict[str, list[float]] = {name: [] for name in models}
        for _ in range(args.rounds):
            base_time = per_forward(base, batch, repeats)
            for name, model in models.items():
                seconds = base_time if model is base else per_forward(model, batch, repeats)
                totals[name].append(seconds)
                added[name].append(seconds - base_time)
        lora_added = statistics.median(added["PEFT LoRA"])
        unit, scale = ("µs", 1e6) if batch_size * length == 1 else ("ms", 1e3)
        print(f"### {shape}: {args.rounds} rounds of {repeats} forwards\n")
        print(f"| model | CPU {unit} per forward (median) | added over the base ({unit}) | added / LoRA's added |")
        print("|---|---|---|---|")
        for name in models:
            total, extra = statistics.median(totals[name]), statistics.median(added[name])
            ratio = "" if name == "base (frozen)" else f"{extra / lora_added:.2f}"
            print(f"| {name} | {total * scale:.1f} | {extra * scale:.1f} | {ratio} |")
        print()


if __name__ == "__main__":
    main()
