"""QLoTR: LoTR adapters trained on a 4-bit base, on CPU, offline.

    .venv/bin/python examples/qlotr.py [--quant nf4|fp4|int8] [--steps 40] [--workdir DIR] [--tiny]

Loads the packaged all-MiniLM-L6-v2 as a sentiment classifier with its Linear layers quantized
by bitsandbytes (transformers' ``BitsAndBytesConfig``; the new classifier head stays float),
attaches rank-8 LoTR adapters to ``query`` and ``value`` with shared factors, and trains them
and the head on the built-in sentiment task. Then it saves the adapter, reloads it onto a
fresh quantized base and checks that the logits are identical, and merges it into the 4-bit
weights (dequantize, add, quantize again), printing how far that rounding moves the logits.
``--tiny`` uses a small random BERT with MiniLM's tokenizer instead (seconds, for the tests).
Needs ``pip install 'tensorlotr[quant,demo]'``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertConfig, BitsAndBytesConfig

import tensorlotr as tlr
from tensorlotr.jobs.data import builtin_sentiment
from tensorlotr.jobs.demo import default_model_dir


def quantization_config(kind: str) -> BitsAndBytesConfig:
    if kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=["classifier"])
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=kind, bnb_4bit_compute_dtype=torch.float32,
        llm_int8_skip_modules=["classifier"],  # the new head is trained in full, in float32
    )  # fmt: skip


def load_quantized(model_dir: Path, kind: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)  # the new head's initialisation
    return AutoModelForSequenceClassification.from_pretrained(
        model_dir, num_labels=2, quantization_config=quantization_config(kind), device_map="cpu"
    )


def tiny_bert(tokenizer, folder: Path) -> Path:
    """A small random BERT with ``tokenizer``'s vocabulary, saved in ``folder``; 64 wide (one 4-bit block)."""
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=64, num_labels=2,
    )  # fmt: skip
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def accuracy(lotr: tlr.LoTRModel, batches: list) -> float:
    lotr.eval()
    with torch.no_grad():
        right = sum(int((lotr(**enc).logits.argmax(-1) == labels).sum()) for enc, labels in batches)
    return right / sum(len(labels) for _, labels in batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quant", choices=["nf4", "fp4", "int8"], default="nf4")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--tiny", action="store_true", help="a small random BERT instead of MiniLM")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message=".*inputs will be cast from.*")  # bitsandbytes' int8 note
    work = args.workdir or Path(tempfile.mkdtemp(prefix="qlotr-"))
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    model_dir = tiny_bert(tokenizer, work / "tiny-bert") if args.tiny else default_model_dir()

    train, test = builtin_sentiment(seed=0)

    def batches(rows: list, count: int) -> list:
        out = []
        for i in range(count):
            chunk = [rows[(i * args.batch_size + j) % len(rows)] for j in range(args.batch_size)]
            enc = tokenizer([s for s, _ in chunk], padding=True, return_tensors="pt")
            out.append((enc, torch.tensor([y for _, y in chunk])))
        return out

    base = load_quantized(model_dir, args.quant, seed=0)
    config = tlr.LoTRConfig(
        rank=8, alpha=16, target_modules=["query", "value"], groups="shared", modules_to_save=["classifier"]
    )
    lotr = tlr.get_lotr_model(base, config)
    lotr.print_trainable_parameters()
    # train before any evaluation: bitsandbytes repacks 4-bit weights for its CPU inference kernel on
    # the first no-grad eval forward, and repacked layers cannot train again on CPU
    optimizer = torch.optim.AdamW([p for p in lotr.parameters() if p.requires_grad], lr=3e-3)
    lotr.train()
    start = time.perf_counter()
    for step, (enc, labels) in enumerate(batches(train, args.steps)):
        loss = lotr(**enc, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step:3d}  loss {loss.item():.4f}")
    print(f"{args.steps} steps on the {args.quant} base in {time.perf_counter() - start:.1f} s")
    held_out = batches(test, 4)
    print(f"held-out accuracy after training: {accuracy(lotr, held_out):.3f}")

    lotr.save_pretrained(work / "adapter")
    size = sum(f.stat().st_size for f in (work / "adapter").iterdir())
    print(f"adapter saved to {work / 'adapter'} ({size / 1024:.0f} KiB)")
    enc, _ = held_out[0]
    reloaded = tlr.LoTRModel.from_pretrained(load_quantized(model_dir, args.quant, seed=1), work / "adapter")
    with torch.no_grad():
        expected = lotr(**enc).logits
        print(f"reloaded onto a fresh {args.quant} base: max |logit difference| = "
              f"{(reloaded(**enc).logits - expected).abs().max():.2e}")  # fmt: skip
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # merging into quantized weights warns of the second rounding
            reloaded.merge_adapter()
        moved = (reloaded(**enc).logits - expected).abs().max()
        print(f"merged into the {args.quant} weights (quantized again): max |logit difference| = "
              f"{moved:.2e} (logits up to {expected.abs().max():.2f})")  # fmt: skip
    print(f"held-out accuracy of the merged model: {accuracy(reloaded, held_out):.3f}")


if __name__ == "__main__":
    main()
