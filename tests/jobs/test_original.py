"""Checkpoints of the original LoTR code (daskol/lotr) converted exactly (issue 23, item 15).

The original code's state dict holds ``M.linear.weight``, ``M.lotr.lhs`` (r, d_out),
``M.lotr.mid`` (r, r) and ``M.lotr.rhs`` (d_in, r) per adapted layer, the shared factors
repeated under every layer, and scales the update by ``scale / r``.
"""

from __future__ import annotations

import torch
from builders import error_line, hidden, logits, run, tiny_llama

import tensorlotr as tlr

RANK = 3


def original_checkpoint(scale: float = 2.0, shared: bool = True, seed: int = 0):
    """The original code's state dict for q_proj and v_proj of the tiny Llama, and the model it computes."""
    base = tiny_llama(0)
    merged = tiny_llama(0)
    generator = torch.Generator().manual_seed(seed)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    for name in ("q_proj", "v_proj"):
        d_out, d_in = (
            base.model.layers[0].self_attn.q_proj.weight.shape
            if name == "q_proj"
            else (base.model.layers[0].self_attn.v_proj.weight.shape)
        )
        lhs, rhs = torch.randn(RANK, d_out, generator=generator), torch.randn(d_in, RANK, generator=generator)
        for i, layer in enumerate(merged.model.layers):
            if not shared and i == 1:
                lhs = torch.randn(RANK, d_out, generator=generator)
            mid = torch.randn(RANK, RANK, generator=generator)
            prefix = f"model.layers.{i}.self_attn.{name}"
            state[f"{prefix}.linear.weight"] = state.pop(f"{prefix}.weight")
            state[f"{prefix}.lotr.lhs"], state[f"{prefix}.lotr.mid"], state[f"{prefix}.lotr.rhs"] = lhs, mid, rhs
            with torch.no_grad():
                getattr(layer.self_attn, name).weight += scale / RANK * (lhs.T @ mid.T @ rhs.T)
    return state, merged.eval()


def test_an_original_checkpoint_converts_exactly_from_the_command_line(tmp_path, capsys):
    state, merged = original_checkpoint(scale=2.0)
    torch.save(state, tmp_path / "original.pt")
    tiny_llama(0).save_pretrained(tmp_path / "base")
    args = ["convert", str(tmp_path / "original.pt"), str(tmp_path / "out"), "--base-model", str(tmp_path / "base")]
    assert run([*args, "--scale", "2", "--json"]) == 0
    lotr = tlr.LoTRModel.from_pretrained(tiny_llama(0), tmp_path / "out").eval()
    with torch.no_grad():
        assert (logits(lotr) - logits(merged)).abs().max().item() < 1e-5
        assert (logits(merged) - logits(tiny_llama(0))).abs().max().item() > 1e-3
    from tensorlotr.jobs.original import convert_original

    report = convert_original(state, tiny_llama(0), tmp_path / "api", scale=2.0)
    assert report is not None and (tmp_path / "api").is_dir()
    api = tlr.LoTRModel.from_pretrained(tiny_llama(0), tmp_path / "api").eval()
    with torch.no_grad():
        assert (logits(api) - logits(merged)).abs().max().item() < 1e-5


def test_factors_that_are_not_shared_are_refused(tmp_path, capsys):
    state, _ = original_checkpoint(shared=False)
    torch.save(state, tmp_path / "original.pt")
    tiny_llama(0).save_pretrained(tmp_path / "base")
    args = ["convert", str(tmp_path / "original.pt"), str(tmp_path / "out"), "--base-model", str(tmp_path / "base")]
    assert run(args) == 2
    line = error_line(capsys.readouterr().err, "convert")
    assert "q_proj" in line, line
    assert not (tmp_path / "out").exists() and hidden(tmp_path) == []


def test_a_checkpoint_of_another_base_is_refused(tmp_path, capsys):
    state, _ = original_checkpoint()
    torch.save(state, tmp_path / "original.pt")
    tiny_llama(7).save_pretrained(tmp_path / "base")  # other frozen weights
    args = ["convert", str(tmp_path / "original.pt"), str(tmp_path / "out"), "--base-model", str(tmp_path / "base")]
    assert run(args) == 2
    assert "trained from another base" in error_line(capsys.readouterr().err, "convert")
    assert not (tmp_path / "out").exists()
    assert run(["convert", str(tmp_path / "original.pt"), str(tmp_path / "out")]) == 2  # no --base-model
    assert "--base-model" in error_line(capsys.readouterr().err, "convert")
