"""The convert job (jobs/convert.py): PEFT LoRA -> LoTR on checkpoints written by peft itself."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from builders import PEFT_VARIANTS, logits, peft_lora, peft_variant, tiny_llama
from safetensors.torch import load_file

import tensorlotr as tlr
from tensorlotr.cli import main as cli
from tensorlotr.io import read_adapter
from tensorlotr.jobs.convert import convert_lora


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


@pytest.mark.parametrize("variant", list(PEFT_VARIANTS))
def test_full_rank_conversion_reproduces_peft_outputs(variant, tmp_path):
    peft_model, pristine = peft_variant(variant, tmp_path / "peft")
    report = convert_lora(tmp_path / "peft", tmp_path / "lotr")
    assert report.relative_error < 1e-5
    lotr = tlr.LoTRModel.from_pretrained(pristine, tmp_path / "lotr")
    torch.testing.assert_close(logits(lotr), logits(peft_model), atol=1e-5, rtol=0)
    assert report.lora_params == sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)


def test_truncated_error_is_exact_and_falls_with_rank(tmp_path):
    peft_variant("llama-rank-pattern", tmp_path / "peft")
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
    peft_variant("llama-rank-pattern", tmp_path / "peft")
    report = convert_lora(tmp_path / "peft", tmp_path / "lotr", energy=0.9)
    ranks = {g.group: g.rank for g in report.groups}
    assert ranks["k_proj"] != ranks["q_proj"]  # k_proj has LoRA rank 2, q_proj rank 4
    files = read_adapter(tmp_path / "lotr")
    assert {n: tuple(g.rank) for n, g in files.groups.items()} == ranks
    tlr.LoTRModel.from_pretrained(tiny_llama(), tmp_path / "lotr")  # loads with mixed ranks


def test_shared_groups(tmp_path):
    peft_model, pristine = peft_variant("llama-rank-pattern", tmp_path / "peft")
    report = convert_lora(tmp_path / "peft", tmp_path / "lotr", groups="shared")
    # q_proj and o_proj are 32x32; k_proj is 16x32 (2 of 4 key-value heads)
    assert {g.group: g.layers for g in report.groups} == {"o_proj+q_proj": 6, "k_proj": 3}
    lotr = tlr.LoTRModel.from_pretrained(pristine, tmp_path / "lotr")
    torch.testing.assert_close(logits(lotr), logits(peft_model), atol=1e-5, rtol=0)


def test_all_zero_lora_converts(tmp_path):
    peft_lora(tmp_path / "peft", tiny_llama(), target_modules=["q_proj"], init_lora_weights=True)  # B = 0
    report = convert_lora(tmp_path / "peft", tmp_path / "lotr", rank=2)
    assert report.relative_error == 0.0
    files = read_adapter(tmp_path / "lotr")
    u = files.factor("q_proj", "out_factor").numpy()
    assert np.isfinite(u).all() and np.allclose(u.T @ u, np.eye(2), atol=1e-6)


def test_rank_above_the_exact_rank_is_clipped_and_reported(tmp_path):
    peft_variant("llama", tmp_path / "peft")
    exact = tlr.convert_lora(tmp_path / "peft")
    huge = tlr.convert_lora(tmp_path / "peft", rank=100000)
    assert [g.rank for g in huge.groups] == [g.rank for g in exact.groups]
    assert huge.lotr_params == exact.lotr_params
    assert any("above its exact rank" in note for note in huge.notes)
    assert "above its exact rank" in huge.text()


# --- the command line ----------------------------------------------------------------


def test_cli_convert_json_force_and_export(tmp_path, capsys):
    peft_variant("llama", tmp_path / "peft")
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


def test_a_lora_with_factors_in_two_dtypes_converts_in_the_wider(tmp_path):
    """Hostile round of issue 23: B in float64 and A in float16 gave a float32 adapter (only A's dtype was read)."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file

    from tensorlotr.io import read_adapter

    model = get_peft_model(
        tiny_llama(6).double(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False)
    )
    model.save_pretrained(tmp_path / "mixed")
    weights = tmp_path / "mixed" / "adapter_model.safetensors"
    tensors = load_file(weights)
    save_file({k: v.half() if "lora_A" in k else v for k, v in tensors.items()}, weights)
    expected = {k: v.half().double() if "lora_A" in k else v for k, v in load_file(weights).items()}
    convert_lora(tmp_path / "mixed", tmp_path / "lotr")
    adapter = read_adapter(tmp_path / "lotr")
    assert {t.dtype for t in adapter.tensors.values()} == {torch.float64}
    scale = 8 / 4
    for module, (b, a) in adapter.lora_factors("q_proj", dtype=torch.float64).items():
        key = f"base_model.model.{module}"
        dense = scale * expected[f"{key}.lora_B.weight"] @ expected[f"{key}.lora_A.weight"]
        assert (b @ a - dense).abs().max().item() < 1e-12 * max(1.0, dense.abs().max().item())
