"""Tiny models, a tiny tokenizer and tiny datasets for the PEFT-method tests, all built offline from configs."""

from __future__ import annotations

from pathlib import Path

import peft
import pytest
import torch
from packaging.version import Version
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    T5Config,
    T5ForConditionalGeneration,
)

try:
    import tensorlotr.peft  # noqa: F401
except ImportError as exc:  # an unsupported PEFT skips these tests; any other import error fails them
    if not getattr(exc, "unsupported_peft", False):
        raise
    pytest.skip(str(exc), allow_module_level=True)

REPO = Path(__file__).resolve().parents[2]

#: PEFT's seq2seq models (T5) fail with transformers 5 before PEFT 0.21.2, for LoRA as for LoTR.
needs_seq2seq_peft = pytest.mark.skipif(
    Version(peft.__version__) < Version("0.21.2"), reason="PEFT's seq2seq models need peft 0.21.2 with transformers 5"
)
WORDS = [
    "the", "a", "cat", "dog", "sat", "ran", "on", "under", "mat", "rug", "red", "blue", "big", "small", "happy",
    "sad", "quickly", "slowly", "and", "then", "it", "was", "is", "good", "bad", "day", "night", "sun", "moon",
    "tree", "house", "bird", "fish", "river", "hill", "old", "new",
]  # fmt: skip
SPECIALS = ["<pad>", "<eos>", "<unk>", "<bos>"]
VOCAB = 64  # len(SPECIALS) + len(WORDS) < 64; the rest of the vocabulary is unused


def tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer of :data:`WORDS`, with ``<pad>`` 0, ``<eos>`` 1, ``<unk>`` 2, ``<bos>`` 3."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {token: i for i, token in enumerate(SPECIALS + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>", bos_token="<bos>"
    )


def sentences(n: int = 16, seed: int = 0) -> list[str]:
    """``n`` short sentences of :data:`WORDS`."""
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(0, len(WORDS), (n, 6), generator=generator)
    return [" ".join(WORDS[i] for i in row) for row in picks.tolist()]


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    """A 2-layer Llama of hidden size 32 (untied head), from a config."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, eos_token_id=1, bos_token_id=3,
        **overrides,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    """A 2-layer GPT-2 of hidden size 32, whose ``lm_head`` is tied to the input embeddings."""
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=3, eos_token_id=1,
        pad_token_id=0,
    )  # fmt: skip
    return GPT2LMHeadModel(config)


def tiny_t5(seed: int = 0) -> T5ForConditionalGeneration:
    """A 2+2-layer T5 of d_model 32."""
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2, num_heads=4,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )  # fmt: skip
    return T5ForConditionalGeneration(config)


def tiny_bert(seed: int = 0) -> BertForSequenceClassification:
    """A 2-layer BERT classifier of hidden size 32, two labels."""
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        num_labels=2, max_position_embeddings=64,
    )  # fmt: skip
    return BertForSequenceClassification(config)


def ids(batch: int = 2, length: int = 7, seed: int = 1) -> torch.Tensor:
    """Random token ids (batch, length) above the special tokens."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(len(SPECIALS), VOCAB, (batch, length), generator=generator)


def randomize_cores(model: torch.nn.Module, adapter: str = "default", seed: int = 0) -> None:
    """Give every core of ``adapter`` random values, as if trained (cores start at zero)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(f"lotr_cores.{adapter}"):
                parameter.copy_(torch.randn(parameter.shape, generator=generator))


def registered_here(config) -> tuple[str, str]:
    """In a spawned process that received ``config``: what PEFT's table maps ``"LOTR"`` to, and the config's type."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    return PEFT_TYPE_TO_CONFIG_MAPPING["LOTR"].__name__, config.peft_type.value
