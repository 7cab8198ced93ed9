"""The parameter-count table of docs/concepts.md: LoRA against LoTR on q and v.

    .venv/bin/python docs/param_table.py

prints the Markdown tables; tests/e2e/test_docs.py checks that concepts.md holds them verbatim.
Counts are of the adapter only (no classifier head). For a projection stack of L layers
of d x d matrices at rank r:

- LoRA: ``L * r * (d_in + d_out)`` per projection;
- LoTR, one group per projection (``groups="by_name"``): ``r*d_out + r*d_in + L*r*r``;
- LoTR, q and v sharing U and V (``groups="shared"``): ``r*d_out + r*d_in + 2*L*r*r`` in all;
- a zoo of K adapters sharing each group's U and V: ``r*d_out + r*d_in + K*L*r*r`` per group.
"""

from __future__ import annotations

#: (name, layers, hidden size): every q and v projection is hidden x hidden.
MODELS = [("all-MiniLM-L6-v2", 6, 384), ("RoBERTa-base", 12, 768), ("Llama-2-7B", 32, 4096)]
RANKS = (8, 32, 128)
PROJECTIONS = 2  # q and v


def lora_params(layers: int, d_out: int, d_in: int, rank: int) -> int:
    """One projection stack's LoRA: ``L * r * (d_in + d_out)``."""
    return layers * rank * (d_in + d_out)


def lotr_params(layers: int, d_out: int, d_in: int, rank: int, stacks: int = 1) -> int:
    """One group of ``stacks`` projections sharing U (d_out, r) and V (d_in, r): one core per layer and stack."""
    return rank * d_out + rank * d_in + stacks * layers * rank * rank


def table() -> str:
    """The Markdown table: per model and rank, q+v adapter parameters of LoRA and LoTR."""
    lines = [
        "| model | layers | d | rank r | LoRA q+v | LoTR q+v (`by_name`) | LoRA / LoTR | LoTR q+v (`shared`) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, layers, d in MODELS:
        for rank in RANKS:
            lora = PROJECTIONS * lora_params(layers, d, d, rank)
            by_name = PROJECTIONS * lotr_params(layers, d, d, rank)
            shared = lotr_params(layers, d, d, rank, stacks=PROJECTIONS)
            lines.append(
                f"| {name} | {layers} | {d} | {rank} | {lora:,} | {by_name:,} | {lora / by_name:.1f}x | {shared:,} |"
            )
    return "\n".join(lines)


def zoo_table(adapters: tuple[int, ...] = (1, 10, 100), rank: int = 8) -> str:
    """K adapters of q and v at rank ``rank``: K LoRAs, K LoTR adapters, and one zoo sharing U and V."""
    lines = [
        f"| model | adapters K | K LoRAs (r={rank}) | K LoTR adapters (r={rank}) | one zoo (r={rank}) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, layers, d in MODELS:
        for k in adapters:
            lora = k * PROJECTIONS * lora_params(layers, d, d, rank)
            lotr = k * PROJECTIONS * lotr_params(layers, d, d, rank)
            zoo = PROJECTIONS * lotr_params(layers, d, d, rank, stacks=k)
            lines.append(f"| {name} | {k} | {lora:,} | {lotr:,} | {zoo:,} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
    print()
    print(zoo_table())
