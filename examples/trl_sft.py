"""Supervised fine-tuning with TRL's SFTTrainer and a LoTR adapter, on a tiny Llama built from a config, offline.

    .venv/bin/python examples/trl_sft.py --workdir /tmp/trl-sft --steps 6

The one change from a LoRA run is the ``peft_config=`` line. The trainer checkpoints the
adapter only (``adapter_config.json`` + ``adapter_model.safetensors``), a second trainer resumes
from the middle checkpoint, and the final adapter reloads through ``PeftModel.from_pretrained``
and ``AutoPeftModelForCausalLM`` with the trained model's logits.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from datasets import Dataset
from peft import AutoPeftModelForCausalLM, PeftModel
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from trl import SFTConfig, SFTTrainer

import tensorlotr  # noqa: F401  (registers LoTR with PEFT as soon as PEFT is imported)
from tensorlotr.peft import LoTRPeftConfig

TEXTS = [
    "the cat sat on the mat", "a dog ran under the old tree", "the sun is big and the moon is small",
    "a red bird sat on the house", "the fish swam in the blue river", "it was a good day on the hill",
    "the small dog was happy", "a big cat ran quickly and then sat",
]  # fmt: skip


def word_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer of the words of ``texts``: a stand-in for ``AutoTokenizer.from_pretrained(...)``."""
    words = sorted({word for text in texts for word in text.split()})
    vocab = {token: i for i, token in enumerate(["<pad>", "<eos>", "<unk>", *words])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--steps", type=int, default=6, help="training steps (even: the run resumes from the middle)")
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="lotr-trl-sft-"))
    half = max(1, args.steps // 2)

    tokenizer = word_tokenizer(TEXTS)
    torch.manual_seed(0)
    llama = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    LlamaForCausalLM(llama).save_pretrained(work / "base")  # a real run: a model id on the Hub
    data = Dataset.from_dict({"text": TEXTS * 4})

    def trainer(output_dir: Path) -> SFTTrainer:
        config = SFTConfig(
            output_dir=str(output_dir), max_steps=2 * half, save_steps=half, per_device_train_batch_size=4,
            learning_rate=5e-3, logging_steps=half, report_to=[], max_length=16, use_cpu=True, bf16=False, seed=0,
        )  # fmt: skip
        return SFTTrainer(
            model=AutoModelForCausalLM.from_pretrained(work / "base"),
            args=config,
            train_dataset=data,
            processing_class=tokenizer,
            # a LoRA run has: peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type=...)
            peft_config=LoTRPeftConfig(rank=8, alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"),
        )

    run = trainer(work / "run")
    trainable, total = run.model.get_nb_trainable_parameters()
    print(f"trainable: {trainable:,} of {total:,} parameters ({type(run.model.base_model).__name__})")
    run.train()
    for checkpoint in sorted((work / "run").glob("checkpoint-*")):
        files = sorted(p.name for p in checkpoint.iterdir())
        weights = [name for name in files if name.startswith("model") or name.startswith("pytorch_model")]
        size = (checkpoint / "adapter_model.safetensors").stat().st_size / 1024
        print(f"{checkpoint.name}: adapter_model.safetensors {size:.1f} KB; base weights saved: {weights or 'none'}")

    resumed = trainer(work / "resumed")
    resumed.train(resume_from_checkpoint=str(work / "run" / f"checkpoint-{half}"))
    difference = max(
        (a - b).abs().max().item()
        for a, b in zip(run.model.parameters(), resumed.model.parameters(), strict=True)
        if a.requires_grad
    )
    print(
        f"resumed from checkpoint-{half} to step {resumed.state.global_step}: max |weight difference| {difference:.2e}"
    )

    final = work / "run" / f"checkpoint-{2 * half}"
    ids = tokenizer(["the cat sat on the small hill"], return_tensors="pt").input_ids
    with torch.no_grad():
        expected = run.model.eval()(input_ids=ids).logits
        loaders = {
            "PeftModel": lambda: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(work / "base"), final),
            "AutoPeftModelForCausalLM": lambda: AutoPeftModelForCausalLM.from_pretrained(final),
        }
        for name, load in loaders.items():
            logits = load().eval()(input_ids=ids).logits
            print(f"reloaded with {name}: max |logit difference| = {(logits - expected).abs().max():.2e}")
    print(f"outputs in {work}")


if __name__ == "__main__":
    main()
