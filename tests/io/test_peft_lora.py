"""PEFT LoRA folders (io/peft_lora.py), written by peft itself: what is read, and clear errors for what cannot be."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from builders import edit_json, error_line, hidden, logits, peft_variant, run, tiny_llama, write_lora
from peft import PeftModel
from safetensors.torch import load_file, save_file

import tensorlotr as tlr
from tensorlotr.cli import main as cli
from tensorlotr.jobs.convert import convert_lora

TARGETS = ["q_proj", "v_proj"]


# --- what PEFT writes, read as PEFT reads it ----------------------------------------------------


def test_weights_only_bin_is_read(tmp_path):
    peft_model, pristine = peft_variant("llama", tmp_path / "peft")
    weights = tmp_path / "peft" / "adapter_model.safetensors"
    torch.save(load_file(str(weights)), tmp_path / "peft" / "adapter_model.bin")
    weights.unlink()
    convert_lora(tmp_path / "peft", tmp_path / "lotr")
    lotr = tlr.LoTRModel.from_pretrained(pristine, tmp_path / "lotr")
    torch.testing.assert_close(logits(lotr), logits(peft_model), atol=1e-5, rtol=0)


def test_lora_alpha_zero_gives_scale_zero_as_in_peft(lora, tmp_path):
    pristine = tiny_llama(0)
    edit_json(lora / "adapter_config.json", lora_alpha=0)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(pristine), lora).eval()
    report = convert_lora(lora, tmp_path / "lotr")
    assert report.relative_error == 0.0
    lotr = tlr.LoTRModel.from_pretrained(copy.deepcopy(pristine), tmp_path / "lotr")
    torch.testing.assert_close(logits(lotr), logits(peft_model), atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(lotr), logits(pristine), atol=1e-6, rtol=0)


def test_missing_r_and_lora_alpha_take_peft_defaults(tmp_path, capsys):
    pristine = write_lora(tmp_path / "lora", r=8, lora_alpha=3)
    edit_json(tmp_path / "lora" / "adapter_config.json", r=None, lora_alpha=None)  # PEFT: r=8, lora_alpha=8
    peft_model = PeftModel.from_pretrained(copy.deepcopy(pristine), tmp_path / "lora").eval()
    convert_lora(tmp_path / "lora", tmp_path / "lotr")
    lotr = tlr.LoTRModel.from_pretrained(copy.deepcopy(pristine), tmp_path / "lotr")
    torch.testing.assert_close(logits(lotr), logits(peft_model), atol=1e-5, rtol=0)
    write_lora(tmp_path / "rank4", r=4)
    edit_json(tmp_path / "rank4" / "adapter_config.json", r=None)
    assert run(["convert", str(tmp_path / "rank4"), str(tmp_path / "out")]) == 2
    assert "has rank 4 but adapter_config.json says r=8 (PEFT's default" in capsys.readouterr().err


# --- bad input: a clear error, a non-zero exit, and no OUT_DIR --------------------------


class NotATensor:
    """Stands for an arbitrary pickled object in a .bin file."""


def _corrupt(kind: str, folder) -> str:
    weights = folder / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    first_a = next(k for k in tensors if k.endswith("lora_A.weight"))
    if kind == "missing config":
        (folder / "adapter_config.json").unlink()
        return "adapter_config.json is missing"
    if kind == "missing weights":
        weights.unlink()
        return "has neither adapter_model.safetensors"
    if kind == "missing tensor":
        del tensors[first_a.replace("lora_A", "lora_B")]
        save_file(tensors, str(weights))
        return "lacks lora_B.weight"
    if kind == "shape mismatch":
        tensors[first_a] = torch.randn(3, tensors[first_a].shape[1])
        save_file(tensors, str(weights))
        return "ranks differ"
    if kind == "truncated":
        weights.write_bytes(weights.read_bytes()[:-100])
        return "cannot be read as safetensors"
    if kind == "nan":
        tensors[first_a][0, 0] = float("nan")
        save_file(tensors, str(weights))
        return "NaN or Inf"
    if kind == "pickle":
        weights.unlink()
        import pickle

        (folder / "adapter_model.bin").write_bytes(pickle.dumps({"x": NotATensor()}))
        return "refusing to unpickle"
    if kind == "dora":
        config = json.loads((folder / "adapter_config.json").read_text())
        config["use_dora"] = True
        (folder / "adapter_config.json").write_text(json.dumps(config))
        return "DoRA"
    if kind == "lora_bias":
        tensors[first_a.replace("lora_A.weight", "lora_B.bias")] = torch.zeros(4)
        save_file(tensors, str(weights))
        return "lora_bias"
    if kind == "embedding":
        tensors["base_model.model.model.embed_tokens.lora_embedding_A"] = torch.zeros(4, 8)
        save_file(tensors, str(weights))
        return "embedding LoRA"
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind",
    [
        "missing config",
        "missing weights",
        "missing tensor",
        "shape mismatch",
        "truncated",
        "nan",
        "pickle",
        "dora",
        "lora_bias",
        "embedding",
    ],
)
def test_bad_checkpoints_fail_cleanly(kind, tmp_path, capsys):
    peft_variant("llama", tmp_path / "peft")
    message = _corrupt(kind, tmp_path / "peft")
    assert cli(["convert", str(tmp_path / "peft"), str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["peft"]  # no temporary folder left either


@pytest.mark.parametrize("dtype", [torch.int8, torch.bool, torch.float8_e4m3fn])
def test_lora_tensors_must_be_floating_point(dtype, lora, tmp_path, capsys):
    weights = lora / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    key = sorted(k for k in tensors if k.endswith("lora_A.weight"))[0]
    tensors[key] = tensors[key].to(dtype)
    save_file(tensors, str(weights))
    assert run(["convert", str(lora), str(tmp_path / "out")]) == 2
    line = error_line(capsys.readouterr().err, "convert")
    assert key in line and str(dtype).removeprefix("torch.") in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({}, "has no peft_type"),
        ({"peft_type": "LORA", "r": 4}, "has no target_modules"),
        ({"peft_type": "IA3", "target_modules": TARGETS}, "peft_type is 'IA3', not 'LORA'"),
        ({"peft_type": "LORA", "target_modules": TARGETS, "r": "four"}, "r must be a positive integer, got 'four'"),
        ({"peft_type": "LORA", "target_modules": TARGETS, "r": 4, "lora_alpha": float("nan")}, "lora_alpha must"),
        ({"peft_type": "LORA", "target_modules": TARGETS, "r": 4, "lora_alpha": float("inf")}, "lora_alpha must"),
        ({"peft_type": "LORA", "target_modules": TARGETS, "r": 4, "alpha_pattern": {"q": "x"}}, "alpha_pattern"),
        ({"peft_type": "LORA", "target_modules": TARGETS, "r": 4, "rank_pattern": {"q_proj(": 2}}, "regular exp"),
        ({"peft_type": "LORA", "target_modules": "q_proj(", "r": 4}, "regular expression"),
        ({"peft_type": "LORA", "target_modules": TARGETS, "r": 4, "use_rslora": "false"}, "true or false"),
        ([1, 2], "holds an array, not a JSON object"),
    ],
)
def test_bad_adapter_configs_are_clear_errors(document, message, lora, tmp_path, capsys):
    config = lora / "adapter_config.json"
    config.write_text(json.dumps(document))
    assert run(["convert", str(lora), str(tmp_path / "out")]) == 2
    line = error_line(capsys.readouterr().err, "convert")
    assert str(config) in line and message in line
    assert not (tmp_path / "out").exists() and hidden(tmp_path) == []


def test_tensor_keys_must_match_the_config(lora, tmp_path, capsys):
    config = lora / "adapter_config.json"
    edit_json(config, target_modules=["k_proj"])
    assert run(["convert", str(lora), str(tmp_path / "out")]) == 2
    assert "match none of the target_modules ['k_proj']" in error_line(capsys.readouterr().err, "convert")
    edit_json(config, target_modules="model\\.layers\\.[01]\\.self_attn\\.(q|v)_proj")  # layer 2 is not targeted
    assert run(["convert", str(lora), str(tmp_path / "out")]) == 2
    assert "model.layers.2.self_attn.q_proj" in error_line(capsys.readouterr().err, "convert")
    edit_json(config, target_modules=TARGETS)
    weights = lora / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    tensors["base_model.model.lm_head.weight"] = torch.zeros(2, 2)  # not in modules_to_save
    save_file(tensors, str(weights))
    assert run(["convert", str(lora), str(tmp_path / "out")]) == 2
    assert "neither LoRA factors nor in the modules_to_save" in error_line(capsys.readouterr().err, "convert")
    edit_json(config, modules_to_save=["lm_head"])
    assert run(["convert", str(lora), str(tmp_path / "out"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["modules_to_save"] == ["lm_head"]


def test_updates_too_large_for_float32_are_refused(lora, tmp_path, capsys):
    """Found by the fuzz: a finite 3e38 overflowed inside the SVD, an internal error (exit 1) naming nothing."""
    weights = lora / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    key = sorted(k for k in tensors if k.endswith("lora_B.weight"))[0]
    tensors[key][0, 0] = 3e38
    save_file(tensors, str(weights))
    assert run(["convert", str(lora), str(tmp_path / "out")]) == 2
    line = error_line(capsys.readouterr().err, "convert")
    assert key.removeprefix("base_model.model.").removesuffix(".lora_B.weight") in line and "too large" in line
    assert not (tmp_path / "out").exists()
