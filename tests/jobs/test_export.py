"""The export job (jobs/export.py): LoTR -> PEFT LoRA, from folders and from trained models, read back by peft."""

from __future__ import annotations

import json

import pytest
import torch
from builders import error_line, hidden, inputs, logits, peft_variant, run, tiny_bert, tiny_gpt2, tiny_llama, twin
from peft import PeftModel

import tensorlotr as tlr
from tensorlotr.io import read_adapter, write_adapter
from tensorlotr.jobs.convert import convert_lora
from tensorlotr.jobs.export import export_lora


@pytest.mark.parametrize("variant", ["llama", "bert", "gpt2"])
def test_export_of_conversion_reproduces_peft_outputs(variant, tmp_path):
    peft_model, pristine = peft_variant(variant, tmp_path / "peft")
    convert_lora(tmp_path / "peft", tmp_path / "lotr")
    summary = export_lora(tmp_path / "lotr", tmp_path / "exported")
    assert summary["modules"] == len([n for n, _ in peft_model.named_modules() if n.endswith(".lora_A")])
    reloaded = PeftModel.from_pretrained(pristine, tmp_path / "exported").eval()
    torch.testing.assert_close(logits(reloaded), logits(peft_model), atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_trained_lotr_exports_to_peft(arch, tmp_path):
    factory = {"gpt2": tiny_gpt2, "bert": tiny_bert}[arch]
    base = factory(3)
    pristine = twin(base)
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


def test_export_refuses_a_nan_group_scale(lora, tmp_path, capsys):
    convert_lora(lora, tmp_path / "lotr")
    config = tmp_path / "lotr" / "lotr_config.json"
    document = json.loads(config.read_text())
    document["groups"]["q_proj"]["scale"] = float("nan")
    config.write_text(json.dumps(document))  # json writes NaN
    assert run(["export-lora", str(tmp_path / "lotr"), str(tmp_path / "out")]) == 2
    line = error_line(capsys.readouterr().err, "export-lora")
    assert str(config) in line and "'scale' must be a finite number, got nan" in line
    assert not (tmp_path / "out").exists() and hidden(tmp_path) == []
    document["groups"]["q_proj"]["scale"] = 1.0
    config.write_text(json.dumps(document))
    files = read_adapter(tmp_path / "lotr")
    files.groups["q_proj"].scale = float("nan")  # an adapter in memory
    with pytest.raises(ValueError, match="non-finite scale"):
        write_adapter(tmp_path / "again", files)
    model = tlr.LoTRModel.from_pretrained(tiny_llama(0), tmp_path / "lotr")  # a diverged training run
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "lotr_" in n).fill_(float("nan"))
    with pytest.raises(ValueError, match="holds NaN or Inf values"):
        export_lora(model, tmp_path / "out")
    assert not (tmp_path / "out").exists() and hidden(tmp_path) == []


# --- issue 23, item 16: the source's dtype is kept unless --dtype asks for another --------------------------


def test_a_float64_adapter_exports_to_a_float64_lora_that_peft_runs_exactly(tmp_path, capsys):
    from safetensors.torch import load_file

    base = tiny_llama(4).double()
    pristine = twin(base)
    lotr = tlr.get_lotr_model(base, tlr.LoTRConfig(rank=(4, 3), alpha=6, target_modules=["q_proj", "v_proj"]))
    lotr.double()
    with torch.no_grad():
        for name, parameter in lotr.named_parameters():
            if "lotr_" in name:
                parameter.copy_(torch.randn_like(parameter) * 0.3)
    lotr.eval()
    lotr.save_pretrained(tmp_path / "lotr64")
    assert {t.dtype for t in read_adapter(tmp_path / "lotr64").tensors.values()} == {torch.float64}
    assert run(["export-lora", str(tmp_path / "lotr64"), str(tmp_path / "lora64")]) == 0  # no --dtype
    tensors = load_file(tmp_path / "lora64" / "adapter_model.safetensors")
    assert {t.dtype for t in tensors.values()} == {torch.float64}
    peft_model = PeftModel.from_pretrained(pristine, tmp_path / "lora64").eval()
    with torch.no_grad():
        theirs, ours = logits(peft_model), logits(lotr)
    assert theirs.dtype == torch.float64 and (theirs - ours).abs().max().item() < 1e-12
    assert (ours - logits(tiny_llama(4).double())).abs().max() > 1e-3  # the adapter does change the outputs
    assert run(["export-lora", str(tmp_path / "lotr64"), str(tmp_path / "lora32"), "--dtype", "float32"]) == 0
    tensors = load_file(tmp_path / "lora32" / "adapter_model.safetensors")
    assert {t.dtype for t in tensors.values()} == {torch.float32}


def test_convert_keeps_a_float64_loras_dtype_unless_told(tmp_path):
    peft_model = tlr_peft_double(tmp_path / "peft64")
    convert_lora(tmp_path / "peft64", tmp_path / "lotr64")
    assert {t.dtype for t in read_adapter(tmp_path / "lotr64").tensors.values()} == {torch.float64}
    assert run(["convert", str(tmp_path / "peft64"), str(tmp_path / "lotr32"), "--dtype", "float32"]) == 0
    assert {t.dtype for t in read_adapter(tmp_path / "lotr32").tensors.values()} == {torch.float32}
    lotr = tlr.LoTRModel.from_pretrained(tiny_llama(5).double(), tmp_path / "lotr64").double().eval()
    with torch.no_grad():
        assert (logits(lotr) - logits(peft_model)).abs().max().item() < 1e-10


def tlr_peft_double(folder):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        tiny_llama(5).double(),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    ).eval()
    model.save_pretrained(folder)
    return model
