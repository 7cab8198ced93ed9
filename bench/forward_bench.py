"""The unmerged adapter's added cost over the frozen base: LoTR against PEFT LoRA at equal rank.

    HF_HUB_OFFLINE=1 python bench/forward_bench.py [--rank 8] [--rounds 7] [--threads 1]

The packaged all-MiniLM-L6-v2 (384 hidden, 6 layers), adapters on ``query`` and ``value``,
no-grad forwards in eval mode, unmerged. Two shapes: decode (batch 1, one token) and prefill
(batch 32 x 64 tokens). Variants: PEFT LoRA; LoTR with one group per target (``by_name``);
LoTR with query and value in one group (``shared``), which computes ``x V`` once per attention
block; and the same shared LoTR with that reuse switched off.

Two measures, both CPU time of the process (``time.process_time``) with ``--threads`` torch
threads, since on a shared machine wall time also counts other jobs; medians over rounds:

- **adapter cost**: each variant's 12 adapted layers (query and value of the 6 blocks), called
  on the hidden states that reach them in a real forward, with each frozen projection replaced
  by a stub that returns its (zero) output at no cost. What remains is exactly what the adapter
  adds to a forward: its products, its addition into the output, and its Python. The shared
  variant runs each block's query and value inside the scope that the block's hooks open.
- **whole model**: the full forward minus the base model's, paired within each round. At
  prefill the adapters add about 2% to the base, within this measure's noise.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import machine

import tensorlotr as tlr
from tensorlotr.jobs.demo import default_model_dir, load_classifier

SHAPES = {"decode (1 x 1)": (1, 1), "prefill (32 x 64)": (32, 64)}
#: calls per measure and round: many for the sub-millisecond decode, few for a prefill forward
REPEATS = {"decode (1 x 1)": {"adapter": 1000, "model": 200}, "prefill (32 x 64)": {"adapter": 40, "model": 4}}


class Stub(nn.Module):
    """Stands in for a frozen projection: returns a zero output of the right shape at no cost."""

    def __init__(self, d_out: int) -> None:
        super().__init__()
        self.d_out = d_out
        self.out = torch.zeros(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (*x.shape[:-1], self.d_out)
        if self.out.shape != shape:
            self.out = torch.zeros(shape)
        return self.out


def make_models(rank: int) -> dict[str, nn.Module]:
    from peft import LoraConfig, get_peft_model

    def base() -> nn.Module:
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


def attention_blocks(model: nn.Module) -> list[nn.Module]:
    """The ``attention.self`` module of each layer, in order."""
    return [m for name, m in model.named_modules() if name.endswith("attention.self")]


def block_inputs(model: nn.Module, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """The hidden states each attention block reads in a forward of ``model``."""
    seen: list[torch.Tensor] = []
    handles = [b.register_forward_pre_hook(lambda _, args: seen.append(args[0])) for b in attention_blocks(model)]
    with torch.no_grad():
        model(**batch)
    for handle in handles:
        handle.remove()
    return seen


def adapter_only(model: nn.Module, shared: bool) -> Callable[[list[torch.Tensor]], None]:
    """Run each block's query and value with the frozen projections stubbed out."""
    blocks = attention_blocks(model)
    for block in blocks:
        for name in ("query", "value"):
            layer = getattr(block, name)
            target = layer if hasattr(layer, "base_layer") else block
            attribute = "base_layer" if hasattr(layer, "base_layer") else name
            setattr(target, attribute, Stub(384))

    def run(hidden: list[torch.Tensor]) -> None:
        for block, h in zip(blocks, hidden, strict=True):
            scope = block.query.factors.shared_input if shared else None
            if scope is not None:
                scope.enter()  # what the block's forward pre-hook does
            block.query(h)
            block.value(h)
            if scope is not None:
                scope.exit()

    return run


def cpu_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Mean CPU seconds per call of ``fn`` over ``repeats`` calls."""
    start = time.process_time()
    for _ in range(repeats):
        fn()
    return (time.process_time() - start) / repeats


def table(title: str, unit: str, scale: float, totals: dict[str, list[float]], added: dict[str, list[float]]) -> None:
    lora_added = statistics.median(added["PEFT LoRA"])
    print(f"{title}\n")
    print(f"| variant | CPU {unit} (median) | added over the base ({unit}) | its range over rounds | added / LoRA's |")
    print("|---|---|---|---|---|")
    for name in totals:
        total, extra = statistics.median(totals[name]), statistics.median(added[name])
        ratio = "" if name == "base (frozen)" else f"{extra / lora_added:.2f}"
        spread = f"{min(added[name]) * scale:.1f} to {max(added[name]) * scale:.1f}"
        print(f"| {name} | {total * scale:.1f} | {extra * scale:.1f} | {spread} | {ratio} |")
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    models = make_models(args.rank)
    stubbed = {name: make_models(args.rank)[name] for name in models}  # separate copies lose their projections
    runs = {name: adapter_only(model, shared=name == "LoTR shared") for name, model in stubbed.items()}
    print(f"Machine: {machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"MiniLM-L6 (384 hidden, 6 layers), rank {args.rank}, targets query+value, unmerged, no grad, eval mode\n")
    with torch.no_grad():
        for shape, (batch_size, length) in SHAPES.items():
            batch = {
                "input_ids": torch.randint(1000, 20000, (batch_size, length)),
                "attention_mask": torch.ones(batch_size, length, dtype=torch.long),
            }
            hidden = block_inputs(models["base (frozen)"], batch)
            unit, scale = ("µs", 1e6) if batch_size * length == 1 else ("ms", 1e3)
            for measure, calls in (
                ("adapter cost (12 layers)", {n: (lambda r=r, h=hidden: r(h)) for n, r in runs.items()}),
                ("whole model forward", {n: (lambda m=m, b=batch: m(**b)) for n, m in models.items()}),
            ):
                repeats = REPEATS[shape]["adapter" if measure.startswith("adapter") else "model"]
                for call in calls.values():
                    cpu_seconds(call, max(1, repeats // 4))  # warm-up
                totals: dict[str, list[float]] = {name: [] for name in calls}
                added: dict[str, list[float]] = {name: [] for name in calls}
                for _ in range(args.rounds):
                    base_time = cpu_seconds(calls["base (frozen)"], repeats)
                    for name, call in calls.items():
                        seconds = base_time if name == "base (frozen)" else cpu_seconds(call, repeats)
                        totals[name].append(seconds)
                        added[name].append(seconds - base_time)
                title = f"### {shape}, {measure}: {args.rounds} rounds of {repeats} calls"
                table(title, unit, scale, totals, added)


if __name__ == "__main__":
    main()
