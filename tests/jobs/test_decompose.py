"""The decompose job (jobs/decompose.py): planted Tucker-2 deltas in sharded checkpoints, refusals, memory."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorly as tl
import torch
from builders import error_line, hidden, logits, run, snapshot, tiny_bert, tiny_gpt2, tiny_llama
from peft import PeftModel
from tensorly.decomposition import partial_tucker

import tensorlotr as tlr
from tensorlotr.cli import main as cli
from tensorlotr.jobs.convert import convert_lora

PLANTED = {"q_proj": (4, 3), "v_proj": (2, 2)}


def planted_pair(noise: float = 1e-4, seed: int = 5):
    """A tiny Llama and a copy plus planted Tucker-2 deltas (ranks PLANTED) plus Gaussian noise."""
    base = tiny_llama(0)
    finetuned = copy.deepcopy(base)
    generator = torch.Generator().manual_seed(seed)
    noise_sq = signal_sq = 0.0
    with torch.no_grad():
        for name, (r_out, r_in) in PLANTED.items():
            d_out, d_in = getattr(base.model.layers[0].self_attn, name).weight.shape
            u = torch.linalg.qr(torch.randn(d_out, r_out, generator=generator))[0]
            v = torch.linalg.qr(torch.randn(d_in, r_in, generator=generator))[0]
            for layer in finetuned.model.layers:
                signal = u @ torch.randn(r_out, r_in, generator=generator) @ v.T
                eps = noise * torch.randn(d_out, d_in, generator=generator)
                getattr(layer.self_attn, name).weight += signal + eps
                signal_sq += float((signal**2).sum())
                noise_sq += float((eps**2).sum())
    return base, finetuned, (noise_sq / signal_sq) ** 0.5


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pair")
    base, finetuned, noise = planted_pair()
    base.save_pretrained(folder / "base", max_shard_size="20KB")
    finetuned.save_pretrained(folder / "ft", max_shard_size="20KB")
    assert (folder / "ft" / "model.safetensors.index.json").is_file()
    return folder, finetuned, noise


@pytest.mark.parametrize("route", [{}, {"gram_max_dim": 8}, {"gram_max_dim": 8, "n_power": 0}])
def test_planted_deltas_are_recovered(sharded, tmp_path, route):
    folder, finetuned, noise = sharded
    result = tlr.decompose(
        folder / "base", folder / "ft", tmp_path / "out", target_modules=["q_proj", "v_proj"],
        rank=(4, 3), dtype=torch.float64, **route,
    )  # fmt: skip
    report = result.report
    assert [g.rank for g in report.groups] == [(4, 3), (4, 3)]
    # the error is the planted noise, less the part of it that lies in the recovered subspaces
    assert 0.5 * noise < report.relative_error < 1.05 * noise
    lotr = tlr.LoTRModel.from_pretrained(tiny_llama(0), tmp_path / "out")
    assert (logits(lotr) - logits(finetuned)).abs().max() < 1e-2
    assert (logits(tiny_llama(0)) - logits(finetuned)).abs().max() > 0.1  # the deltas matter


def test_energy_finds_planted_ranks(sharded):
    folder, _, _ = sharded
    report = tlr.decompose(folder / "base", folder / "ft", target_modules=["q_proj", "v_proj"], energy=0.9999).report
    assert {g.group: g.rank for g in report.groups} == PLANTED
    assert all(g.energy_kept >= 0.9999 for g in report.groups)


def test_full_rank_is_exact(sharded):
    folder, finetuned, _ = sharded
    result = tlr.decompose(folder / "base", folder / "ft", target_modules=["q_proj", "v_proj"], dtype=torch.float64)
    assert result.report.relative_error < 1e-6
    lotr = result.to_model(tiny_llama(0))
    torch.testing.assert_close(logits(lotr), logits(finetuned), atol=1e-5, rtol=0)


def test_in_memory_sources_and_bf16(sharded):
    _, finetuned, noise = sharded
    base = tiny_llama(0)
    from_modules = tlr.decompose(base, finetuned, target_modules=["q_proj", "v_proj"], rank=(4, 3)).report
    halves = {k: v.bfloat16() for k, v in finetuned.state_dict().items()}
    base_halves = {k: v.bfloat16() for k, v in base.state_dict().items()}
    from_bf16 = tlr.decompose(base_halves, halves, target_modules=["q_proj", "v_proj"], rank=(4, 3)).report
    assert abs(from_modules.relative_error - noise) < 0.5 * noise
    assert from_bf16.relative_error < 0.05  # bf16 rounding of the weights dominates the planted noise
    assert torch.equal(
        finetuned.state_dict()["model.layers.0.self_attn.q_proj.weight"],
        finetuned.model.layers[0].self_attn.q_proj.weight,
    )


@pytest.mark.parametrize("rank", [(2, 2), (4, 3), (6, 5)])
def test_matches_tensorly_partial_tucker(rank):
    base, finetuned, _ = planted_pair(noise=0.05)
    report = tlr.decompose(base, finetuned, target_modules=["q_proj"], rank=rank, dtype=torch.float64).report
    stack = np.stack(
        [
            (f.self_attn.q_proj.weight - b.self_attn.q_proj.weight).detach().double().numpy()
            for b, f in zip(base.model.layers, finetuned.model.layers, strict=True)
        ]
    )
    (core, factors), _ = partial_tucker(stack, rank=list(rank), modes=[1, 2], n_iter_max=0)
    reference = np.linalg.norm(stack - tl.tucker_to_tensor((core, [np.eye(len(stack)), *factors]))) / np.linalg.norm(
        stack
    )
    assert abs(report.groups[0].relative_error - reference) < 1e-6


def test_hooi_does_not_increase_error():
    base, finetuned, _ = planted_pair(noise=0.05)
    hosvd = tlr.decompose(base, finetuned, target_modules=["q_proj"], rank=(2, 2), dtype=torch.float64).report
    hooi = tlr.decompose(base, finetuned, target_modules=["q_proj"], rank=(2, 2), dtype=torch.float64, n_iter=3).report
    assert hooi.relative_error <= hosvd.relative_error + 1e-9
    assert hooi.groups[0].passes == 2 + 2 * 3


def test_gpt2_conv1d_orientation(tmp_path):
    base = tiny_gpt2(0)
    finetuned = copy.deepcopy(base)
    with torch.no_grad():
        for block in finetuned.transformer.h:
            block.attn.c_attn.weight += 0.05 * torch.randn_like(block.attn.c_attn.weight)
    base.save_pretrained(tmp_path / "base")
    finetuned.save_pretrained(tmp_path / "ft")
    result = tlr.decompose(
        tmp_path / "base", tmp_path / "ft", tmp_path / "out", target_modules=["c_attn"], dtype=torch.float64
    )
    assert result.report.groups[0].shape == (96, 32)  # (d_out, d_in), although Conv1D stores (32, 96)
    lotr = tlr.LoTRModel.from_pretrained(tiny_gpt2(0), tmp_path / "out")
    torch.testing.assert_close(logits(lotr), logits(finetuned), atol=1e-4, rtol=0)


def test_changed_modules_are_reported_and_saved(tmp_path):
    base = tiny_bert(0)
    finetuned = copy.deepcopy(base)
    with torch.no_grad():
        for layer in finetuned.bert.encoder.layer:
            layer.attention.self.query.weight += 0.01 * torch.randn_like(layer.attention.self.query.weight)
        finetuned.classifier.weight += 1.0
    report = tlr.decompose(base, finetuned, target_modules=["query"]).report
    assert [c["key"] for c in report.changed_modules] == ["classifier.weight"] and report.saved_modules == []
    result = tlr.decompose(
        base, finetuned, tmp_path / "out", target_modules=["query"], save_changed_modules=True, dtype=torch.float64
    )
    assert result.report.saved_modules == ["classifier"]
    lotr = tlr.LoTRModel.from_pretrained(tiny_bert(0), tmp_path / "out")
    torch.testing.assert_close(logits(lotr), logits(finetuned), atol=1e-5, rtol=0)


def test_bad_input(tmp_path):
    base, finetuned, _ = planted_pair()
    with pytest.raises(ValueError, match=r"all deltas are zero"):
        tlr.decompose(base, copy.deepcopy(base), target_modules=["q_proj"])
    with pytest.raises(ValueError, match=r"match no 2-d weight.*close names: \[.*'q_proj'"):
        tlr.decompose(base, finetuned, target_modules=["qproj"])
    with pytest.raises(ValueError, match=r"base has shape \(32, 32\), fine-tuned has \(32, 16\)"):
        other = dict(finetuned.state_dict())
        other["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(32, 16)
        tlr.decompose(base, other, target_modules=["q_proj"])
    with pytest.raises(ValueError, match=r"lacks tensors the base has"):
        other = dict(finetuned.state_dict())
        del other["model.layers.1.mlp.up_proj.weight"]
        tlr.decompose(base, other, target_modules=["q_proj"])
    with pytest.raises(ValueError, match=r"layers\.1\.self_attn\.q_proj\.weight: .* NaN or Inf"):
        other = {k: v.clone() for k, v in finetuned.state_dict().items()}
        other["model.layers.1.self_attn.q_proj.weight"][3, 4] = float("nan")
        tlr.decompose(base, other, target_modules=["q_proj"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        tlr.decompose(tmp_path / "nothing", finetuned, target_modules=["q_proj"])


def test_finetuned_model_with_an_extra_layer_is_refused():
    base = tiny_llama(0).state_dict()
    finetuned = {k: v + 0.01 if "q_proj" in k else v for k, v in base.items()}
    finetuned |= {k.replace("layers.2.", "layers.3."): v.clone() for k, v in base.items() if "layers.2." in k}
    with pytest.raises(
        ValueError, match=r"targeted modules that base state dict lacks: \['model\.layers\.3\.self_attn"
    ):
        tlr.decompose(base, finetuned, target_modules=["q_proj"])


# --- energy and iteration counts ----------------------------------------------------------


@pytest.mark.parametrize("energy", ["1.5", "0", "-1", "nan"])
def test_energy_out_of_range_is_refused(energy, pair, lora, capsys):
    args = ["decompose", str(pair / "base"), str(pair / "ft"), str(pair / "o"), "--target-modules", "q_proj"]
    assert run([*args, "--energy", energy]) == 2
    assert run(["convert", str(lora), str(pair / "o"), "--energy", energy]) == 2
    capsys.readouterr()
    with pytest.raises(ValueError, match="energy"):
        tlr.decompose(pair / "base", pair / "ft", target_modules=["q_proj"], energy=float(energy))
    with pytest.raises(ValueError, match="energy"):
        convert_lora(lora, energy=float(energy))
    assert not (pair / "o").exists()


def test_energy_one_keeps_the_exact_rank(pair):
    exact = tlr.decompose(pair / "base", pair / "ft", target_modules=["q_proj"]).report
    full = tlr.decompose(pair / "base", pair / "ft", target_modules=["q_proj"], energy=1.0).report
    assert full.groups[0].rank == exact.groups[0].rank
    assert full.relative_error < 1e-6


def test_negative_iteration_counts_are_refused(pair, lora, capsys):
    args = ["decompose", str(pair / "base"), str(pair / "ft"), str(pair / "o"), "--target-modules", "q_proj"]
    assert run([*args, "--power-iters", "-1"]) == 2
    assert run([*args, "--hooi-iters", "-1"]) == 2
    assert run(["convert", str(lora), str(pair / "o"), "--hooi-iters", "-1"]) == 2
    capsys.readouterr()
    for options in ({"n_iter": -1}, {"n_power": -2}):
        with pytest.raises(ValueError, match=">= 0"):
            tlr.decompose(pair / "base", pair / "ft", target_modules=["q_proj"], **options)
    assert not (pair / "o").exists()


# --- the command line ----------------------------------------------------------------


def test_cli(sharded, tmp_path, capsys):
    folder, _, _ = sharded
    args = [
        "decompose",
        str(folder / "base"),
        str(folder / "ft"),
        str(tmp_path / "out"),
        "--target-modules",
        "q_proj,v_proj",
    ]
    assert cli([*args, "--rank", "4,3", "--json", "--export-lora"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [g["rank"] for g in report["groups"]] == [[4, 3], [4, 3]]
    assert report["export_lora"]["modules"] == 6
    peft_model = PeftModel.from_pretrained(tiny_llama(0), tmp_path / "out-lora").eval()
    lotr = tlr.LoTRModel.from_pretrained(tiny_llama(0), tmp_path / "out")
    torch.testing.assert_close(logits(peft_model), logits(lotr), atol=1e-5, rtol=0)
    assert cli([*args, "--energy", "0.99"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert cli([*args, "--energy", "0.99", "--force"]) == 0
    same = [
        "decompose",
        str(folder / "base"),
        str(folder / "base"),
        str(tmp_path / "same"),
        "--target-modules",
        "q_proj",
    ]
    assert cli(same) == 2
    assert "all deltas are zero" in capsys.readouterr().err
    assert not (tmp_path / "same").exists()


def test_decompose_export_lora_into_its_own_output_is_refused(pair, capsys):
    args = ["decompose", str(pair / "base"), str(pair / "ft"), str(pair / "out"), "--target-modules", "q_proj"]
    assert run([*args, "--json"]) == 0
    before = snapshot(pair / "out")
    capsys.readouterr()
    assert run([*args, "--export-lora", str(pair / "out"), "--force"]) == 2
    assert "is the input" in error_line(capsys.readouterr().err, "decompose")
    assert snapshot(pair / "out") == before
    # without --force, an existing LoRA folder is refused before OUT_DIR is written
    (pair / "lora").mkdir()
    fresh = [*args[:3], str(pair / "fresh"), *args[4:]]
    assert run([*fresh, "--export-lora", str(pair / "lora")]) == 2
    assert "already exists" in error_line(capsys.readouterr().err, "decompose")
    assert not (pair / "fresh").exists() and hidden(pair) == []


# --- peak memory ------------------------------------------------------------------------


MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    from pathlib import Path
    import tensorlotr as tlr

    def hwm_mib():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024

    folder, mode = Path(sys.argv[1]), sys.argv[2]
    x = torch.randn(1152, 1152)  # warm up the BLAS and LAPACK workspaces, which any run pays once
    y = (x @ torch.randn(1152, 24), torch.randn(24, 1152) @ x, torch.linalg.qr(torch.randn(1152, 24)))
    del x, y
    before = hwm_mib()
    if mode == "decompose":
        tlr.decompose(folder / "base", folder / "ft", target_modules=["proj"], rank=8)
    else:  # control: what materialising the stack costs, measured the same way
        from safetensors.torch import load_file
        b = load_file(str(folder / "base" / "model.safetensors"))
        f = load_file(str(folder / "ft" / "model.safetensors"))
        stack = torch.stack([f[k] - b[k] for k in sorted(b)])
    print(json.dumps({"growth": hwm_mib() - before}))
    """
)


def test_peak_memory_is_far_below_the_stack(tmp_path):
    """A 32 x 1152 x 1152 float32 stack is 162 MiB; decompose must stay well under it."""
    from safetensors.torch import save_file

    n_layers, d = 32, 1152
    generator = torch.Generator().manual_seed(0)
    weights = {f"layers.{i}.proj.weight": torch.randn(d, d, generator=generator) for i in range(n_layers)}
    for name, shift in (("base", 0.0), ("ft", 0.01)):
        (tmp_path / name).mkdir()
        save_file(
            {k: v + shift * torch.randn(d, d, generator=generator) for k, v in weights.items()},
            str(tmp_path / name / "model.safetensors"),
        )
    del weights
    stack_mib = n_layers * d * d * 4 / 2**20

    def growth(mode: str) -> float:
        done = subprocess.run(
            [sys.executable, "-c", MEMORY_SCRIPT, str(tmp_path), mode], capture_output=True, text=True, check=True
        )
        return json.loads(done.stdout.strip().splitlines()[-1])["growth"]

    control = growth("materialise")
    assert control > stack_mib  # the measurement sees a materialised stack
    used = growth("decompose")
    print(f"peak growth: decompose {used:.0f} MiB, materialised stack {control:.0f} MiB ({stack_mib:.0f} MiB of data)")
    assert used < 0.35 * stack_mib, (used, stack_mib, control)


def test_legacy_non_zip_pytorch_model_bin_is_read_as_convert_reads_it(sharded, tmp_path):
    """Issue 23, item 13: a legacy (non-zip) ``pytorch_model.bin`` cannot be memory-mapped; it is read whole."""
    folder, finetuned, _ = sharded
    base = tiny_llama(0)
    for name, model in (("base", base), ("ft", finetuned)):
        model.config.save_pretrained(tmp_path / name)
        state = {k: v.contiguous().clone() for k, v in model.state_dict().items()}
        torch.save(state, tmp_path / name / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    with open(tmp_path / "ft" / "pytorch_model.bin", "rb") as handle:
        assert handle.read(2) != b"PK"  # not a zip file
    kwargs = dict(target_modules=["q_proj", "v_proj"], rank=(4, 3), dtype=torch.float64)
    legacy = tlr.decompose(tmp_path / "base", tmp_path / "ft", tmp_path / "out", **kwargs).report
    reference = tlr.decompose(folder / "base", folder / "ft", **kwargs).report
    assert [g.relative_error for g in legacy.groups] == pytest.approx([g.relative_error for g in reference.groups])
    assert (tmp_path / "out" / "adapter_config.json").is_file() or (tmp_path / "out" / "lotr_config.json").is_file()
    assert run(["decompose", str(tmp_path / "base"), str(tmp_path / "ft"), str(tmp_path / "cli"), "--target-modules",
                "q_proj", "--rank", "2", "--json"]) == 0  # fmt: skip
