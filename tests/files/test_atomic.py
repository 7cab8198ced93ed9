"""Issue 10: no command destroys data or returns a wrong answer with exit code 0.

One test per defect found by trying the commands as a new user and a hostile one would.
"""

from __future__ import annotations

import copy
import ctypes
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from models import inputs, tiny_llama
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

import tensorlotr as tlr
from tensorlotr.cli import main as cli
from tensorlotr.convert import convert_lora, export_lora
from tensorlotr.io import atomic
from tensorlotr.io.lotr_format import read_adapter, write_adapter
from tensorlotr.logs import read_logs, tb2parquet

TARGETS = ["q_proj", "v_proj"]


# --- helpers, shared with test_fuzz_cli and test_fault_injection -----------------------------


def write_lora(folder: Path, seed: int = 0, **config: object) -> torch.nn.Module:
    """A PEFT LoRA checkpoint of a tiny Llama, written by peft with non-zero B; returns the pristine base."""
    base = tiny_llama(seed)
    pristine = copy.deepcopy(base)
    torch.manual_seed(seed + 1)
    options = {"r": 4, "lora_alpha": 8, "target_modules": TARGETS, "init_lora_weights": False, **config}
    get_peft_model(base, LoraConfig(**options)).save_pretrained(folder)
    return pristine


def edit_json(path: Path, **changes: object) -> None:
    """Set keys of a JSON object file; a value of ``None`` deletes the key."""
    document = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            document.pop(key, None)
        else:
            document[key] = value
    path.write_text(json.dumps(document))


def run(args: list[str]) -> int:
    """The exit code of ``tensorlotr ARGS``, usage errors (argparse's ``SystemExit``) included."""
    try:
        return cli(args)
    except SystemExit as exc:
        return int(exc.code)


def error_line(err: str, command: str) -> str:
    """The one ``tensorlotr COMMAND: error: …`` line of ``err``; fails on a traceback or several errors."""
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith(f"tensorlotr {command}: error: ")]
    assert len(errors) == 1, err
    return errors[0]


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


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs()).logits


@pytest.fixture()
def lora(tmp_path: Path) -> Path:
    write_lora(tmp_path / "lora")
    return tmp_path / "lora"


@pytest.fixture()
def pair(tmp_path: Path) -> Path:
    """``base/`` and ``ft/`` model folders (sharded safetensors); the fine-tuned one has q_proj updates."""
    base = tiny_llama(0)
    finetuned = copy.deepcopy(base)
    with torch.no_grad():
        for layer in finetuned.model.layers:
            layer.self_attn.q_proj.weight += 0.01 * torch.randn_like(layer.self_attn.q_proj.weight)
    base.save_pretrained(tmp_path / "base", max_shard_size="20KB")
    finetuned.save_pretrained(tmp_path / "ft", max_shard_size="20KB")
    return tmp_path


# --- data loss ---------------------------------------------------------------------------


def test_output_equal_to_the_input_is_refused_even_with_force(lora, capsys):
    before = snapshot(lora)
    assert run(["convert", str(lora), str(lora), "--force"]) == 2
    assert "is the input" in error_line(capsys.readouterr().err, "convert")
    assert snapshot(lora) == before


@pytest.mark.parametrize("command", ["convert", "export-lora"])
def test_output_containing_or_inside_the_input_is_refused(command, tmp_path, capsys):
    source = tmp_path / "par" / "in"
    write_lora(source)
    if command == "export-lora":
        assert run(["convert", str(source), str(tmp_path / "lotr"), "--json"]) == 0
        shutil.rmtree(source)
        shutil.move(tmp_path / "lotr", source)
    capsys.readouterr()
    before = snapshot(tmp_path / "par")
    assert run([command, str(source), str(tmp_path / "par"), "--force"]) == 2
    assert "contains the input" in error_line(capsys.readouterr().err, command)
    assert run([command, str(source), str(source / "sub"), "--force"]) == 2
    assert "lies inside the input" in error_line(capsys.readouterr().err, command)
    assert snapshot(tmp_path / "par") == before


def test_tb2parquet_output_inside_the_log_folder_is_refused(tmp_path, capsys):
    (tmp_path / "logs").mkdir()
    assert run(["tb2parquet", str(tmp_path / "logs"), str(tmp_path / "logs" / "x.parquet")]) == 2
    assert "lies inside the input" in error_line(capsys.readouterr().err, "tb2parquet")
    with pytest.raises(ValueError, match="lies inside the input"):
        tb2parquet(tmp_path / "logs", tmp_path / "logs" / "x.parquet")


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


def test_replacement_by_two_renames_puts_the_old_output_back_when_interrupted(tmp_path, monkeypatch):
    """Without RENAME_EXCHANGE, an interruption between the two renames restores the old output."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    monkeypatch.setattr(atomic, "_exchange", lambda first, second: False)
    rename = os.rename

    def interrupted(src: os.PathLike, dst: os.PathLike) -> None:
        if Path(src).name.startswith(".out.tmp-"):  # the second rename: the old output is already aside
            raise KeyboardInterrupt
        rename(src, dst)

    monkeypatch.setattr(os, "rename", interrupted)
    with pytest.raises(KeyboardInterrupt), atomic.atomic_dir(out, force=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert snapshot(out) == {"old.txt": b"old"} and hidden(tmp_path) == []
    monkeypatch.setattr(os, "rename", rename)
    with atomic.atomic_dir(out, force=True) as tmp:  # the fallback, uninterrupted
        (tmp / "new.txt").write_text("new")
    assert snapshot(out) == {"new.txt": b"new"} and hidden(tmp_path) == []


def test_replacement_is_one_exchange(tmp_path, monkeypatch):
    """On Linux the old output is never absent: one renameat2(RENAME_EXCHANGE), no second rename."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")

    def no_rename(src: os.PathLike, dst: os.PathLike) -> None:
        raise AssertionError(f"rename {src} -> {dst}: the exchange should have been used")

    monkeypatch.setattr(os, "rename", no_rename)
    with atomic.atomic_dir(out, force=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert snapshot(out) == {"new.txt": b"new"} and hidden(tmp_path) == []


@pytest.mark.parametrize("legacy", [False, True])
def test_a_crash_between_the_two_renames_is_recovered_by_the_next_run(legacy, lora, tmp_path, capsys):
    assert run(["convert", str(lora), str(tmp_path / "out"), "--rank", "2", "--json"]) == 0
    before = snapshot(tmp_path / "out")
    # what a kill -9 between the renames leaves; older versions moved the old output to .out.old-*/x
    aside = tmp_path / (".out.old-abcdefgh" if legacy else f".out.old-{dead_pid()}-abcdefgh")
    if legacy:
        aside.mkdir()
    (tmp_path / "out").rename(aside / "x" if legacy else aside)
    capsys.readouterr()
    assert run(["convert", str(lora), str(tmp_path / "out"), "--json"]) == 2  # restored, so it exists
    err = capsys.readouterr().err
    assert f"warning: restored {tmp_path / 'out'} from {aside.name}" in err
    assert "already exists" in error_line(err, "convert")
    assert snapshot(tmp_path / "out") == before and hidden(tmp_path) == []


def test_leftovers_of_a_killed_run_are_removed_and_reported(lora, tmp_path, capsys):
    assert run(["convert", str(lora), str(tmp_path / "out"), "--json"]) == 0
    stale = tmp_path / f".out.tmp-{dead_pid()}-abcdefgh"
    stale.mkdir()
    (stale / "lotr_model.safetensors").write_bytes(b"\0" * 1000)
    old = tmp_path / f".out.old-{dead_pid()}-abcdefgh"  # out exists: this is stale, not restored
    old.mkdir()
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as running:
        live = tmp_path / f".out.tmp-{running.pid}-abcdefgh"  # a writer that still runs
        live.mkdir()
        try:
            assert run(["convert", str(lora), str(tmp_path / "out"), "--rank", "2", "--force", "--json"]) == 0
        finally:
            running.kill()
    err = capsys.readouterr().err
    assert f"warning: removed {stale}, left by an interrupted run" in err
    assert f"warning: removed {old}, left by an interrupted run" in err
    assert hidden(tmp_path) == [live.name]
    assert read_adapter(tmp_path / "out").groups["q_proj"].rank == (2, 2)


@pytest.mark.parametrize(("names", "message"), [("a,a,a", "unique"), ("tag", "clash"), ("x,step", "clash")])
def test_tb2parquet_names_must_be_unique_and_not_reserved(names, message, tmp_path, capsys):
    (tmp_path / "logs").mkdir()
    assert run(["tb2parquet", str(tmp_path / "logs"), str(tmp_path / "x.parquet"), "--names", names]) == 2
    assert message in capsys.readouterr().err
    with pytest.raises(ValueError, match=message):
        tb2parquet(tmp_path / "logs", tmp_path / "x.parquet", names.split(","))
    with pytest.raises(ValueError, match=message):
        read_logs(tmp_path / "logs", names.split(","))
    assert not (tmp_path / "x.parquet").exists()


def test_logs_tags_regex_is_checked_in_the_api(tmp_path):
    with pytest.raises(ValueError, match=r"tags '\(' is not a valid regular expression"):
        read_logs(tmp_path, tags="(")
    with pytest.raises(ValueError, match="repeated"):
        read_logs(tmp_path, index=["tag", "tag"])


# --- wrong results with exit code 0 ----------------------------------------------------------


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


def test_rank_above_the_exact_rank_is_clipped_and_reported(lora, tmp_path, capsys):
    exact = convert_lora(lora, None)
    assert run(["convert", str(lora), str(tmp_path / "out"), "--rank", "100000", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [g["rank"] for g in report["groups"]] == [list(g.rank) for g in exact.groups]
    assert report["totals"]["lotr_params"] == exact.lotr_params
    assert any("100000x100000" in note for note in report["notes"])


# --- inputs accepted silently ----------------------------------------------------------------


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


def test_utf16_config_names_the_file(lora, tmp_path, capsys):
    config = lora / "adapter_config.json"
    config.write_text(config.read_text(), encoding="utf-16")
    assert run(["convert", str(lora), str(tmp_path / "out")]) == 2
    assert f"{config} is not UTF-8 text" in error_line(capsys.readouterr().err, "convert")


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


@pytest.mark.parametrize(
    "options",
    [{"alpha": float("nan")}, {"alpha": float("inf")}, {"alpha_pattern": {"q_proj": float("nan")}}, {"dropout": 1e999}],
)
def test_lotr_config_refuses_non_finite_values(options):
    with pytest.raises(ValueError, match=r"must be a positive finite number|dropout must be in \[0, 1\)"):
        tlr.LoTRConfig(**options)


def test_finetuned_model_with_an_extra_layer_is_refused():
    base = tiny_llama(0).state_dict()
    finetuned = {k: v + 0.01 if "q_proj" in k else v for k, v in base.items()}
    finetuned |= {k.replace("layers.2.", "layers.3."): v.clone() for k, v in base.items() if "layers.2." in k}
    with pytest.raises(
        ValueError, match=r"targeted modules that base state dict lacks: \['model\.layers\.3\.self_attn"
    ):
        tlr.decompose(base, finetuned, target_modules=["q_proj"])


@pytest.mark.parametrize("shard", ["../../etc/passwd", "/etc/passwd", "sub/../../x.safetensors"])
def test_shard_files_must_stay_inside_the_model_folder(shard, pair, capsys):
    index = pair / "ft" / "model.safetensors.index.json"
    document = json.loads(index.read_text())
    document["weight_map"][next(iter(document["weight_map"]))] = shard
    index.write_text(json.dumps(document))
    args = ["decompose", str(pair / "base"), str(pair / "ft"), str(pair / "o"), "--target-modules", "q_proj"]
    assert cli(args) == 2
    line = error_line(capsys.readouterr().err, "decompose")
    assert f"shard {shard!r} lies outside the model folder" in line and str(index) in line
    assert not (pair / "o").exists()


# --- tracebacks --------------------------------------------------------------------------------


def _without_file_privileges() -> None:
    """In the child: drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH, so even root obeys file modes."""
    if os.geteuid() != 0:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2):
        if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def test_permission_errors_exit_1_and_name_the_file(tmp_path):
    write_lora(tmp_path / "lora")
    (tmp_path / "readonly").mkdir()
    os.chmod(tmp_path / "readonly", 0o555)
    os.chmod(tmp_path / "lora" / "adapter_config.json", 0o000)
    for args, culprit in (
        (["convert", "lora", "out"], "lora/adapter_config.json"),
        (["export-lora", "lora", "readonly/out"], "readonly/out"),
    ):
        if args[0] == "export-lora":
            os.chmod(tmp_path / "lora" / "adapter_config.json", 0o644)
            convert_lora(tmp_path / "lora", tmp_path / "lotr")
            args[1] = "lotr"
        done = subprocess.run(
            [sys.executable, "-m", "tensorlotr", *args, "--json"], cwd=tmp_path, capture_output=True, text=True,
            check=False, preexec_fn=_without_file_privileges,
        )  # fmt: skip
        assert done.returncode == 1, done.stderr
        line = error_line(done.stderr, args[0])
        assert culprit in line and "Permission denied" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora", "lotr", "readonly"]
    assert list((tmp_path / "readonly").iterdir()) == []


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.pop("groups"), "'groups' must be a non-empty object"),
        (lambda d: d.update(groups=[]), "'groups' must be a non-empty object"),
        (lambda d: d["groups"]["q_proj"].update(scale="x"), "'scale' must be a finite number"),
        (lambda d: d["groups"]["q_proj"].update(rank=[0, 2]), "'rank' must be two positive integers"),
        (lambda d: d["groups"]["q_proj"].pop("modules"), "'modules' must be a non-empty list"),
        (lambda d: d.update(config=[1]), "'config' must be an object"),
        (lambda d: d.update(format_version="1"), "format version"),
    ],
)
def test_malformed_lotr_configs_are_clear_errors(edit, message, lora, tmp_path, capsys):
    convert_lora(lora, tmp_path / "lotr")
    config = tmp_path / "lotr" / "lotr_config.json"
    document = json.loads(config.read_text())
    edit(document)
    config.write_text(json.dumps(document))
    for command in (["inspect", str(tmp_path / "lotr")], ["export-lora", str(tmp_path / "lotr"), str(tmp_path / "o")]):
        assert cli(command) == 2
        line = error_line(capsys.readouterr().err, command[0])
        assert str(config) in line and message in line
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("output", [".", "..", "sub/.."])
def test_current_or_parent_folder_as_output_is_refused(output, lora, tmp_path, monkeypatch, capsys):
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    before = snapshot(tmp_path)
    assert run(["convert", str(lora), output, "--force"]) == 2
    assert "names the current or a parent folder" in error_line(capsys.readouterr().err, "convert")
    assert snapshot(tmp_path) == before


def test_broken_pipe_is_quiet(lora):
    child = subprocess.Popen(
        [sys.executable, "-m", "tensorlotr", "inspect", str(lora)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    child.stdout.close()  # the reader leaves before anything is written, as `| head -0` does
    err = child.stderr.read().decode()
    assert child.wait() == 0 and err == ""


def test_demo_with_a_missing_model_folder_is_a_clear_error(tmp_path, capsys):
    assert run(["demo", "--model", str(tmp_path / "nope")]) == 2
    assert str(tmp_path / "nope") in error_line(capsys.readouterr().err, "demo")
    (tmp_path / "empty").mkdir()
    assert run(["demo", "--model", str(tmp_path / "empty")]) == 2
    assert "config.json" in error_line(capsys.readouterr().err, "demo")


# --- modes ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("umask", "folder", "file"), [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600)])
def test_outputs_honour_the_umask(umask, folder, file, lora, tmp_path):
    previous = os.umask(umask)
    try:
        convert_lora(lora, tmp_path / "lotr")
        export_lora(tmp_path / "lotr", tmp_path / "exported")
        convert_lora(lora, tmp_path / "lotr", rank=2, force=True)  # a replaced output too
    finally:
        os.umask(previous)
    for out in (tmp_path / "lotr", tmp_path / "exported"):
        assert out.stat().st_mode & 0o777 == folder
        assert {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()} == dict.fromkeys(os.listdir(out), file)


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


def test_bad_regexes_on_the_command_line_are_one_line_errors(pair, capsys):
    (pair / "logs").mkdir()
    assert run(["tb2parquet", str(pair / "logs"), str(pair / "x.parquet"), "--tags", "("]) == 2
    assert "invalid regular expression '('" in error_line(capsys.readouterr().err, "tb2parquet")
    args = ["decompose", str(pair / "base"), str(pair / "ft"), str(pair / "o"), "--target-modules", "re:("]
    assert run(args) == 2
    assert "invalid regular expression '('" in error_line(capsys.readouterr().err, "decompose")


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("config.json", "[1]", "config.json holds an array, not a JSON object"),
        ("config.json", "{", "config.json is not valid JSON"),
        ("model.safetensors.index.json", '{"weight_map": [1]}', "model.safetensors.index.json is not a safetensors"),
    ],
)
def test_bad_model_folder_json_names_the_file(name, text, message, pair, capsys):
    (pair / "ft" / name).write_text(text)
    args = ["decompose", str(pair / "base"), str(pair / "ft"), str(pair / "o"), "--target-modules", "q_proj"]
    assert run(args) == 2
    assert f"{pair / 'ft'}/{message}" in error_line(capsys.readouterr().err, "decompose")


def test_utf16_data_file_names_the_file(tmp_path):
    from tensorlotr.data import read_tsv

    (tmp_path / "train.tsv").write_text("sentence\tlabel\ngood\t1\n", encoding="utf-16")
    with pytest.raises(ValueError, match=r"train\.tsv is not UTF-8 text"):
        read_tsv(tmp_path / "train.tsv")
