"""The model card (io/model_card.py): front matter, the groups table, and the user's edits kept on every save."""

from __future__ import annotations

import pytest
from builders import tiny_bert, tiny_llama

import tensorlotr as tlr
from tensorlotr.io.model_card import ADAPTER_PLACEHOLDER, auto_class, card_body, write_model_card


def test_model_card_front_matter_and_user_edits_survive(tmp_path):
    lotr = tlr.get_lotr_model(tiny_llama(0), tlr.LoTRConfig(rank=2, target_modules=["q_proj", "v_proj"]))
    files = lotr.adapter_files()
    files.base_model["name_or_path"] = "meta-llama/Llama-2-7b-hf"
    card = write_model_card(tmp_path, files)
    text = card.read_text()
    assert text.startswith("---\n") and "library_name: tensorlotr" in text
    assert "base_model: meta-llama/Llama-2-7b-hf" in text and "| q_proj |" in text
    card.write_text(text.replace("# LoTR adapter", "# My adapter\n\nTrained on my data.") + "\nlicense note\n")
    write_model_card(tmp_path, files)
    again = card.read_text()
    assert "Trained on my data." in again and "license note" in again and again.count("library_name") == 1


def test_model_card_is_written_and_user_edits_survive(tmp_path):
    lotr = tlr.get_lotr_model(tiny_bert(0), tlr.LoTRConfig(rank=2, target_modules=["query", "value"]))
    lotr.save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: tensorlotr" in card and "| query |" in card
    (tmp_path / "README.md").write_text(card + "\nMy notes.\n")
    lotr.save_pretrained(tmp_path)
    assert "My notes." in (tmp_path / "README.md").read_text()


# --- the loading snippet: the task's Auto class, the Hub repo after a push, no local path ----------------------


def snippet(card: str) -> str:
    return card.split("```python\n", 1)[1].split("```", 1)[0]


def test_the_snippet_of_a_causal_lm_uses_its_auto_class_and_runs(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    tiny_llama(0).save_pretrained(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")  # name_or_path: a local, absolute path
    lotr = tlr.get_lotr_model(base, tlr.LoTRConfig(rank=2, target_modules=["q_proj"]))  # no task_type
    with torch.no_grad():
        next(iter(lotr.lotr_layers()))[1].lotr_core.normal_()
    lotr.save_pretrained(tmp_path / "adapter")
    card = (tmp_path / "adapter" / "README.md").read_text()
    assert "from transformers import AutoModelForCausalLM" in card and "AutoModel." not in card
    assert str(tmp_path) not in card and "base_model:" not in card  # a local path is no Hub id
    code = snippet(card).replace('"BASE_MODEL"', repr(str(tmp_path / "base")))
    code = code.replace(ADAPTER_PLACEHOLDER, repr(str(tmp_path / "adapter")))
    scope: dict = {}
    exec(code, scope)  # the card's own code loads the adapter
    x = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        torch.testing.assert_close(scope["model"].eval()(input_ids=x).logits, lotr.eval()(input_ids=x).logits)


@pytest.mark.parametrize(
    ("task_type", "base_class", "auto"),
    [
        ("CAUSAL_LM", None, "AutoModelForCausalLM"),
        ("SEQ_CLS", "LlamaForCausalLM", "AutoModelForSequenceClassification"),  # the task wins
        (None, "GPT2LMHeadModel", "AutoModelForCausalLM"),
        (None, "T5ForConditionalGeneration", "AutoModelForSeq2SeqLM"),
        (None, "BertForSequenceClassification", "AutoModelForSequenceClassification"),
        (None, "BertModel", "AutoModel"),
        (None, None, "AutoModel"),
    ],
)
def test_auto_class_by_task_then_by_base_class(task_type, base_class, auto):
    assert auto_class(task_type, base_class) == auto


def test_the_repo_id_is_filled_in_for_a_push(tmp_path):
    files = tlr.get_lotr_model(tiny_bert(0), tlr.LoTRConfig(rank=2, target_modules=["query"])).adapter_files()
    files.base_model["name_or_path"] = "google-bert/bert-base-uncased"
    body = card_body(files, repo_id="me/my-adapter")
    assert ADAPTER_PLACEHOLDER not in body
    assert 'tlr.LoTRModel.from_pretrained(base, "me/my-adapter")' in body
    assert 'AutoModelForSequenceClassification.from_pretrained("google-bert/bert-base-uncased")' in body
    named = card_body(files, "second", repo_id="me/my-adapter")
    assert 'from_pretrained(base, "me/my-adapter", subfolder="second", adapter_name="second")' in named
    assert 'adapter_name="second")' in card_body(files, "second") and ADAPTER_PLACEHOLDER in card_body(files, "second")

    card = write_model_card(tmp_path, files)  # saved before the push: the placeholder
    assert ADAPTER_PLACEHOLDER in card.read_text()
    card.write_text(card.read_text() + "\nMy notes.\n")
    text = write_model_card(tmp_path, files, repo_id="me/my-adapter").read_text()  # the push fills it in
    assert ADAPTER_PLACEHOLDER not in text and '"me/my-adapter"' in text and "My notes." in text


def test_save_pretrained_with_a_repo_id_names_it_in_every_card(tmp_path):
    lotr = tlr.get_lotr_model(tiny_llama(0), tlr.LoTRConfig(rank=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    lotr.add_adapter("other", tlr.LoTRConfig(rank=2, target_modules=["v_proj"], task_type="CAUSAL_LM"))
    lotr.save_pretrained(tmp_path, repo_id="me/adapters")
    default = (tmp_path / "README.md").read_text()
    other = (tmp_path / "other" / "README.md").read_text()
    assert 'from_pretrained(base, "me/adapters")' in default and ADAPTER_PLACEHOLDER not in default
    assert 'from_pretrained(base, "me/adapters", subfolder="other", adapter_name="other")' in other
    assert "AutoModelForCausalLM" in default and "AutoModelForCausalLM" in other
