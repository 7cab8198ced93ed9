"""PEFT LoRA -> LoTR -> PEFT LoRA on a small Llama built from a config, end to end.

    .venv/bin/python examples/lora_roundtrip.py --workdir /tmp/roundtrip

Writes a LoRA checkpoint with peft, converts it at full and truncated rank, prints the
reports, exports the LoTR adapter back to PEFT's format and checks that peft reproduces the
LoTR model's outputs.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import tensorlotr as tlr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="lotr-roundtrip-"))
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=64,
    )  # fmt: skip
    base = LlamaForCausalLM(config).eval()
    lora = get_peft_model(
        copy.deepcopy(base), LoraConfig(r=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    ).eval()
    lora.save_pretrained(work / "lora")
    ids = torch.randint(0, 128, (2, 16))

    print(tlr.convert_lora(work / "lora", work / "lotr", force=True).table())
    print(tlr.convert_lora(work / "lora", work / "lotr-r8", rank=8, force=True).table())
    tlr.export_lora(work / "lotr", work / "exported", force=True)
    with torch.no_grad():
        reference = lora(input_ids=ids).logits
        lotr = tlr.LoTRModel.from_pretrained(copy.deepcopy(base), work / "lotr")
        exported = PeftModel.from_pretrained(copy.deepcopy(base), work / "exported").eval()
        print(f"LoTR vs LoRA max |logit difference|: {(lotr(input_ids=ids).logits - reference).abs().max():.2e}")
        print(
            f"exported vs LoRA max |logit difference|: {(exported(input_ids=ids).logits - reference).abs().max():.2e}"
        )
    print(f"outputs in {work}")


if __name__ == "__main__":
    main()
