"""The LoRA zoo (jobs/zoo.py): many PEFT LoRAs in one shared basis, growth, fairness, export, inspection."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from builders import bert_loras, logits, peft_lora, tiny_bert, tiny_llama
from peft import PeftModel
from safetensors.torch import load_file, save_file

import tensorlotr as tlr
from tensorlotr.cli import main as cli
from tensorlotr.jobs.inspect import inspect_adapter
from tensorlotr.jobs.zoo import add_to_zoo, compress_zoo

#: Adapters of one base that differ in rank, alpha, rslora, rank patterns and targets.
ZOO = {
    "alpha": dict(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8),
    "beta": dict(target_modules=["q_proj", "v_proj", "down_proj"], r=2, lora_alpha=3, use_rslora=True),
    "gamma": dict(target_modules=["q_proj", "o_proj"], r=3, lora_alpha=6, rank_pattern={"o_proj": 2}),
}


@pytest.fixture(scope="module")
def zoo_sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    models = {
        name: peft_lora(root / name, tiny_llama(0), seed=seed, **kwargs)
        for seed, (name, kwargs) in enumerate(ZOO.items())
    }
    return root, models


def test_full_rank_zoo_reproduces_every_peft_adapter(zoo_sources, tmp_path):
    root, models = zoo_sources
    report = compress_zoo([root / n for n in ZOO], tmp_path / "zoo")
    assert [a.adapter for a in report.adapters] == list(ZOO)
    assert all(a.relative_error < 1e-5 for a in report.adapters)
    groups = {g["group"]: g for g in report.groups}
    assert groups["q_proj"]["adapters"] == 3 and groups["down_proj"]["adapters"] == 1  # absent groups cost nothing
    zoo = report.zoo
    assert zoo is not None and not any(k.startswith("adapters.alpha.cores.") and "down_proj" in k for k in zoo.tensors)
    for name, peft_model in models.items():
        tlr.export_lora(tmp_path / "zoo", tmp_path / f"lora-{name}", adapter=name)
        reloaded = PeftModel.from_pretrained(tiny_llama(0), tmp_path / f"lora-{name}").eval()
        torch.testing.assert_close(logits(reloaded), logits(peft_model), atol=1e-5, rtol=0)


def test_compressed_zoo_stores_less_and_reports_errors(zoo_sources, tmp_path, capsys):
    root, _ = zoo_sources
    assert cli(["zoo", "compress", *(str(root / n) for n in ZOO), str(tmp_path / "zoo"), "--rank", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["totals"]["stored_params"] < report["totals"]["separate_params"]
    assert all(0 < a["relative_error"] < 1 for a in report["adapters"])
    assert cli(["inspect", str(tmp_path / "zoo"), "--json"]) == 0
    inspected = json.loads(capsys.readouterr().out)
    assert [a["adapter"] for a in inspected["adapters"]] == list(ZOO)
    assert inspected["totals"] == report["totals"]
    assert cli(["inspect", str(tmp_path / "zoo")]) == 0
    assert "smaller" in capsys.readouterr().out


def _planted(n_adapters, n_layers=4, d=24, rank=3, lora_rank=3, noise=1e-3, seed=0):
    """LoRAs whose updates are U G_{a,l} V^T with shared U, V, plus small noise (as B, A factors)."""
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((d, rank)))
    v, _ = np.linalg.qr(rng.standard_normal((d, rank)))
    out = []
    for _ in range(n_adapters):
        bs, as_ = [], []
        for _ in range(n_layers):
            core = rng.standard_normal((rank, rank))
            b = np.concatenate([u @ core, noise * rng.standard_normal((d, lora_rank))], axis=1)
            a = np.concatenate([v.T, rng.standard_normal((lora_rank, d)) / np.sqrt(d)], axis=0)
            bs.append(b)
            as_.append(a)
        out.append((bs, as_))
    return u, v, out


def test_planted_zoo_is_recovered_to_the_noise_level():
    u, v, zoo = _planted(5)
    bs = [b for adapter in zoo for b in adapter[0]]
    as_ = [a for adapter in zoo for a in adapter[1]]
    tucker = tlr.tucker2_lowrank(bs, as_, rank=3)
    assert tlr.relative_error_lowrank(tucker, bs, as_) < 5e-3
    # the shared subspaces are the planted ones
    assert np.linalg.norm(tucker.out_factor @ (tucker.out_factor.T @ u) - u) < 1e-2
    assert np.linalg.norm(tucker.in_factor @ (tucker.in_factor.T @ v) - v) < 1e-2


def test_zoo_add_projects_the_new_adapter_onto_the_basis(zoo_sources, tmp_path):
    root, _ = zoo_sources
    compress_zoo([root / "alpha", root / "gamma"], tmp_path / "zoo", rank=3)
    zoo_before = load_file(str(tmp_path / "zoo" / "zoo_model.safetensors"))
    report = add_to_zoo(tmp_path / "zoo", root / "beta", name="beta")
    zoo_after = load_file(str(tmp_path / "zoo" / "zoo_model.safetensors"))
    for key, tensor in zoo_before.items():  # the other adapters are untouched
        torch.testing.assert_close(zoo_after[key], tensor, atol=0, rtol=0)
    lora = load_file(str(root / "beta" / "adapter_model.safetensors"))
    config = json.loads((root / "beta" / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"] ** 0.5  # rslora
    module = "model.layers.1.self_attn.q_proj"
    b = lora[f"base_model.model.{module}.lora_B.weight"].double()
    a = lora[f"base_model.model.{module}.lora_A.weight"].double()
    u = zoo_after["factors.q_proj.out_factor"].double()
    v = zoo_after["factors.q_proj.in_factor"].double()
    by_hand = torch.linalg.pinv(u) @ (scale * b @ a) @ torch.linalg.pinv(v).T
    torch.testing.assert_close(zoo_after[f"adapters.beta.cores.{module}"].double(), by_hand, atol=1e-5, rtol=1e-4)
    assert "down_proj" in {g["group"] for g in report.groups}  # a group the zoo lacked is added
    beta = next(a for a in report.adapters if a.adapter == "beta")
    assert 0 < beta.relative_error < 1


def test_zoo_refit_recompresses_everything(zoo_sources, tmp_path):
    root, _ = zoo_sources
    compress_zoo([root / "alpha", root / "gamma"], tmp_path / "zoo")
    report = add_to_zoo(tmp_path / "zoo", root / "beta", refit=True)
    assert {a.adapter for a in report.adapters} == {"alpha", "gamma", "beta"}
    assert all(a.relative_error < 1e-5 for a in report.adapters)  # full rank stays exact


def test_fair_zoo_keeps_the_small_adapter_and_min_retention_is_guaranteed(tmp_path):
    folders = bert_loras(tmp_path)
    plain = {a.adapter: a.relative_error for a in compress_zoo(folders, None, rank=4, fairness="none").adapters}
    fair = {a.adapter: a.relative_error for a in compress_zoo(folders, None, rank=4).adapters}
    assert plain["small"] > 0.9 and plain["big"] < 0.8  # the plain objective sacrifices the small adapter
    assert fair["small"] < plain["small"] - 0.1
    assert max(fair.values()) < max(plain.values())
    guaranteed = compress_zoo(folders, None, rank=4, min_retention=0.8)
    for row in guaranteed.adapter_groups:
        assert 1 - row["compressed_relative_error"] ** 2 >= 0.8 - 1e-9, row
    raised = [g for g in guaranteed.groups if g["rank"] != [4, 4]]
    assert len(raised) == len(guaranteed.notes) and all("raised" in n for n in guaranteed.notes)


def test_bad_zoo_inputs_fail_clearly(zoo_sources, tmp_path, capsys):
    root, _ = zoo_sources
    peft_lora(tmp_path / "bert-lora", tiny_bert(0), seed=0, target_modules=["query"], r=2)
    with pytest.raises(ValueError, match="unique"):
        compress_zoo([root / "alpha", root / "alpha"], None)
    with pytest.raises(ValueError, match=r"not for the same base|different base"):
        compress_zoo([root / "alpha", tmp_path / "bert-lora"], None, names=["a", "b"])
    compress_zoo([root / "alpha"], tmp_path / "zoo")
    with pytest.raises(ValueError, match="is a zoo"):
        compress_zoo([tmp_path / "zoo"], None)
    assert cli(["export-lora", str(tmp_path / "zoo"), str(tmp_path / "x")]) == 2
    assert "--adapter" in capsys.readouterr().err
    assert cli(["convert", str(tmp_path / "zoo"), str(tmp_path / "y")]) == 2
    assert "zoo" in capsys.readouterr().err
    with pytest.raises(ValueError, match="already has an adapter 'alpha'"):
        add_to_zoo(tmp_path / "zoo", root / "alpha")
    shapes = load_file(str(root / "alpha" / "adapter_model.safetensors"))
    bad = {k: (torch.zeros(v.shape[0], 7) if "lora_A" in k else v) for k, v in shapes.items()}
    (tmp_path / "odd").mkdir()
    save_file(bad, str(tmp_path / "odd" / "adapter_model.safetensors"))
    (tmp_path / "odd" / "adapter_config.json").write_text((root / "alpha" / "adapter_config.json").read_text())
    with pytest.raises(ValueError, match="not for the same base"):
        compress_zoo([root / "alpha", tmp_path / "odd"], None)
    assert inspect_adapter(tmp_path / "zoo")["adapters"][0]["adapter"] == "alpha"
    for name, base in (("one", "org/base-a"), ("two", "org/base-b")):
        (tmp_path / name).mkdir()
        config = json.loads((root / "alpha" / "adapter_config.json").read_text())
        (tmp_path / name / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": base}))
        save_file(shapes, str(tmp_path / name / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=r"different base models \(one: org/base-a, two: org/base-b\)"):
        compress_zoo([tmp_path / "one", tmp_path / "two"], None)
