"""The model card (io/model_card.py): front matter, the groups table, and the user's edits kept on every save."""

from __future__ import annotations

from builders import tiny_bert, tiny_llama

import tensorlotr as tlr
from tensorlotr.io.model_card import write_model_card


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
