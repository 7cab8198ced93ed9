"""PEFT LoRA -> LoTR -> PEFT LoRA, on checkpoints written by peft itself."""

from __future__ import annotations

import copy
import itertools
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from models import inputs, tiny_bert, tiny_gpt2, tiny_llama
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

import tensorlotr as tlr
from tensorlotr.cli import main as cli
from tensorlotr.convert import convert_lora, export_lora, inspect_adapter
from tensorlotr.io import read_adapter

VARIANTS = {
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


def make_peft(variant: str, folder, seed: int = 0):
    """A PEFT LoRA checkpoint with non-zero B, and a pristine copy of its base model."""
    factory, kwargs = VARIANTS[variant]
    base = factory(seed)
    pristine = copy.deepcopy(base)
    torch.manual_seed(seed + 100)
    peft_model = get_peft_model(base, LoraConfig(init_lora_weights=False, **kwargs)).eval()
    peft_model.save_pretrained(folder)
    return peft_model, pristine


def logits(model, batch=None):
    with torch.no_grad():
        return model(**(batch or inputs())).logits


def dense_updates(peft_dir) -> dict[str, torch.Tensor]:
    """dW of every module, straight from the PEFT files, in float64."""
    config = json.loads((peft_dir / "adapter_config.json").read_text())
    tensors = load_file(str(peft_dir / "adapter_model.safetensors"))
    out = {}
    for key, a in tensors.items():
        if not key.endswith("lora_A.weight"):
            continue
        module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        b = tensors[key.replace("lora_A", "lora_B")]
        r = a.shape[0]
        alpha = next((v for k, v in config["alpha_pattern"].items() if module.endswith(k)), config["lora_alpha"])
        scale = alpha / (r**0.5 if config["use_rslora"] else r)
        out[module] = scale * b.double() @ a.double()
    return out


def dense_error(lotr_dir, peft_dir) -> float:
    files = read_adapter(lotr_dir)
    deltas = dense_updates(peft_dir)
    err = ref = 0.0
    for name, group in files.groups.items():
        u, v = files.factor(name, "out_factor").double(), files.factor(name, "in_factor").double()
        for module in group.modules:
            approx = group.scale * u @ files.core(module).double() @ v.T
            err += float(((deltas[module] - approx) ** 2).sum())
            ref += float((deltas[module] ** 2).sum())
    return (err / ref) ** 0.5


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_full_rank_conversion_reproduces_peft_outputs(variant, tmp_path):
    peft_model, pristine = make_peft(variant, tmp_path / "peft")
    report = convert_lora(tmp_path / "peft", tmp_path / "lotr")
    assert report.relative_error < 1e-5
    lotr = tlr.LoTRModel.from_pretrained(pristine, tmp_path / "lotr")
    torch.testing.assert_close(logits(lotr), logits(peft_model), atol=1e-5, rtol=0)
    assert report.lora_params == sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)


@pytest.mark.parametrize("variant", ["llama", "bert", "gpt2"])
def test_export_of_conversion_reproduces_peft_outputs(variant, tmp_path):
    peft_model, pristine = make_peft(variant, tmp_path / "peft")
    convert_lora(tmp_path / "peft", tmp_path / "lotr")
    summary = export_lora(tmp_path / "lotr", tmp_path / "exported")
    assert summary["modules"] == len([n for n, _ in peft_model.named_modules() if n.endswith(".lora_A")])
    reloaded = PeftModel.from_pretrained(pristine, tmp_path / "exported").eval()
    torch.testing.assert_close(logits(reloaded), logits(peft_model), atol=1e-5, rtol=0)


def test_truncated_error_is_exact_and_falls_with_rank(tmp_path):
    make_peft("llama-rank-pattern", tmp_path / "peft")
    errors = []
    for rank in (1, 2, 4, 8):
        report = convert_lora(tmp_path / "peft", tmp_path / f"lotr{rank}", rank=rank)
        measured = dense_error(tmp_path / f"lotr{rank}", tmp_path / "peft")
        assert abs(report.relative_error - measured) < 1e-6
        for group in report.groups:  # per group too
            assert 0 <= group.relative_error <= 1
        errors.append(report.relative_error)
    assert all(a > b for a, b in itertools.pairwise(errors))
    hooi = convert_lora(tmp_path / "peft", None, rank=2, n_iter=5)
    assert hooi.relative_error <= errors[1] + 1e-7


def test_energy_gives_per_group_ranks(tmp_path):
    make_peft("llama-rank-pattern", tmp_path / "peft")
    report = convert_lora(tmp_path / "peft", tmp_path / "lotr", energy=0.9)
    ranks = {g.group: g.rank for g in report.groups}
    assert ranks["k_proj"] != ranks["q_proj"]  # k_proj has LoRA rank 2, q_proj rank 4
    files = read_adapter(tmp_path / "lotr")
    assert {n: tuple(g.rank) for n, g in files.groups.items()} == ranks
    tlr.LoTRModel.from_pretrained(tiny_llama(), tmp_path / "lotr")  # loads with mixed ranks


@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_trained_lotr_exports_to_peft(arch, tmp_path):
    factory = {"gpt2": tiny_gpt2, "bert": tiny_bert}[arch]
    base = factory(3)
    pristine = copy.deepcopy(base)
    targets = {"gpt2": ["c_attn", "c_fc"], "bert": ["query", "value"]}[arch]
    config = tlr.LoTRConfig(
        rank=(4, 2), alpha=4, target_modules=targets, modules_to_save=["classifier"] if arch == "bert" else None
    )
    lotr = tlr.get_lotr_model(base, config)
    optimizer = torch.optim.Adam([p for p in lotr.parameters() if p.requires_grad], lr=0.05)
    for step in range(3):
        loss = lotr(**inputs(seed=step)).logits.pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    lotr.eval()
    export_lora(lotr, tmp_path / "exported")
    peft_model = PeftModel.from_pretrained(pristine, tmp_path / "exported").eval()
    torch.testing.assert_close(logits(peft_model), logits(lotr), atol=1e-5, rtol=0)
    assert (logits(peft_model) - logits(factory(3))).abs().max() > 1e-4


def test_shared_groups(tmp_path):
    peft_model, pristine = make_peft("llama-rank-pattern", tmp_path / "peft")
    report = convert_lora(tmp_path / "peft", tmp_path / "lotr", groups="shared")
    # q_proj and o_proj are 32x32; k_proj is 16x32 (2 of 4 key-value heads)
    assert {g.group: g.layers for g in report.groups} == {"o_proj+q_proj": 6, "k_proj": 3}
    lotr = tlr.LoTRModel.from_pretrained(pristine, tmp_path / "lotr")
    torch.testing.assert_close(logits(lotr), logits(peft_model), atol=1e-5, rtol=0)


def test_inspect_both_formats(tmp_path):
    make_peft("bert", tmp_path / "peft")
    convert_lora(tmp_path / "peft", tmp_path / "lotr", rank=2)
    peft_info, lotr_info = inspect_adapter(tmp_path / "peft"), inspect_adapter(tmp_path / "lotr")
    assert peft_info["format"] == "peft-lora" and lotr_info["format"] == "lotr"
    assert [g["group"] for g in peft_info["groups"]] == [g["group"] for g in lotr_info["groups"]]
    assert peft_info["groups"][0]["dtype"] == "float32"
    assert all(g["rank"] == [2, 2] for g in lotr_info["groups"])


# --- the command line ----------------------------------------------------------------


def test_cli_convert_json_force_and_export(tmp_path, capsys):
    make_peft("llama", tmp_path / "peft")
    assert cli(["convert", str(tmp_path / "peft"), str(tmp_path / "out"), "--rank", "4,2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [g["rank"] for g in report["groups"]] == [[4, 2]] * 3
    assert report["totals"]["lotr_params"] == sum(g["lotr_params"] for g in report["groups"])
    assert cli(["convert", str(tmp_path / "peft"), str(tmp_path / "out")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert read_adapter(tmp_path / "out").groups["q_proj"].rank == (4, 2)  # untouched
    assert cli(["convert", str(tmp_path / "peft"), str(tmp_path / "out"), "--energy", "0.99", "--force"]) == 0
    assert "total" in capsys.readouterr().out
    assert cli(["export-lora", str(tmp_path / "out"), str(tmp_path / "lora")]) == 0
    assert cli(["inspect", str(tmp_path / "lora"), "--json"]) == 0
    capsys.readouterr()
    assert cli(["inspect", str(tmp_path)]) == 2
    assert not list(tmp_path.glob(".*tmp*"))


def test_console_script(tmp_path):
    make_peft("bert", tmp_path / "peft")
    done = subprocess.run(
        [sys.executable, "-m", "tensorlotr", "convert", str(tmp_path / "peft"), str(tmp_path / "out"), "--json"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["modules_to_save"] == ["classifier"]


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
    make_peft("llama", tmp_path / "peft")
    message = _corrupt(kind, tmp_path / "peft")
    assert cli(["convert", str(tmp_path / "peft"), str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["peft"]  # no temporary folder left either


def test_weights_only_bin_is_read(tmp_path):
    peft_model, pristine = make_peft("llama", tmp_path / "peft")
    weights = tmp_path / "peft" / "adapter_model.safetensors"
    torch.save(load_file(str(weights)), tmp_path / "peft" / "adapter_model.bin")
    weights.unlink()
    convert_lora(tmp_path / "peft", tmp_path / "lotr")
    lotr = tlr.LoTRModel.from_pretrained(pristine, tmp_path / "lotr")
    torch.testing.assert_close(logits(lotr), logits(peft_model), atol=1e-5, rtol=0)


def test_all_zero_lora_converts(tmp_path):
    base = tiny_llama()
    get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(tmp_path / "peft")  # B = 0
    report = convert_lora(tmp_path / "peft", tmp_path / "lotr", rank=2)
    assert report.relative_error == 0.0
    files = read_adapter(tmp_path / "lotr")
    u = files.factor("q_proj", "out_factor").numpy()
    assert np.isfinite(u).all() and np.allclose(u.T @ u, np.eye(2), atol=1e-6)
