"""Fine-tuned minus base -> a LoTR adapter, on a small Llama built from a config, end to end.

    .venv/bin/python examples/decompose_finetuned.py --workdir /tmp/decompose

Saves a small Llama as the base, fine-tunes only its ``q_proj`` and ``v_proj`` weights for
a few steps on a toy next-token task, saves the fine-tuned model, then decomposes the
difference into LoTR adapters: at full rank (exact) and at 90% energy. For each it prints
the report and the largest logit difference between the base with the adapter loaded and
the fine-tuned model. The same as the command

    tensorlotr decompose WORKDIR/base WORKDIR/finetuned WORKDIR/lotr --target-modules q_proj,v_proj
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import tensorlotr as tlr

VOCAB = 64


def fine_tune(model: LlamaForCausalLM, steps: int) -> None:
    """Train q_proj and v_proj only (everything else frozen) to predict ``token + 1``."""
    trained = [p for name, p in model.named_parameters() if name.endswith(("q_proj.weight", "v_proj.weight"))]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in trained:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(trained, lr=1e-2)
    model.train()
    for step in range(steps):
        start = torch.randint(0, VOCAB, (8, 1))
        ids = (start + torch.arange(16)) % VOCAB
        loss = model(input_ids=ids, labels=ids).loss  # labels shift inside: next token = token + 1
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step == 0 or step == steps - 1:
            print(f"fine-tuning step {step}: loss {loss.item():.3f}")
    model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="lotr-decompose-"))
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=64,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(work / "base")
    finetuned = LlamaForCausalLM.from_pretrained(work / "base")
    fine_tune(finetuned, args.steps)
    finetuned.save_pretrained(work / "finetuned")

    ids = torch.randint(0, VOCAB, (2, 16))
    with torch.no_grad():
        reference = finetuned(input_ids=ids).logits
    for name, energy in (("lotr", None), ("lotr-e90", 0.9)):
        result = tlr.decompose(
            work / "base", work / "finetuned", work / name, target_modules=["q_proj", "v_proj"], energy=energy,
            force=True,
        )  # fmt: skip
        print(result.report.text())
        lotr = tlr.LoTRModel.from_pretrained(LlamaForCausalLM.from_pretrained(work / "base"), work / name)
        with torch.no_grad():
            diff = (lotr(input_ids=ids).logits - reference).abs().max()
        label = "full rank" if energy is None else f"energy {energy}"
        print(f"{label}: max |logit difference| vs the fine-tuned model: {diff:.2e}\n")
    print(f"outputs in {work}")


if __name__ == "__main__":
    main()
