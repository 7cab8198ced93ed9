"""Hostile zoos: ``zoo add`` as safe as the other writers, and zoo files read as strictly as adapters.

Issue 23, items 1, 2, 3, 5 (data lost by ``zoo add``), 9, 10, 11 (wrong answers with exit
code 0) and the zoo's part of 14 (messages that do not name the culprit).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import tensorlotr as tlr
from tensorlotr.cli import main as cli

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=40, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def write_lora(folder: Path, seed: int = 0, arch: str = "llama") -> None:
    """A rank-4 PEFT LoRA (non-zero B) of a tiny Llama, BERT or GPT-2, written by peft."""
    if arch == "llama":
        base, targets = tiny_llama(), ["q_proj", "v_proj"]
    elif arch == "bert":
        config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                            intermediate_size=48, max_position_embeddings=32)  # fmt: skip
        base, targets = BertModel(config), ["query", "value"]
    else:
        config = GPT2Config(vocab_size=64, n_embd=32, n_layer=3, n_head=4, n_positions=32)
        base, targets = GPT2LMHeadModel(config), ["c_attn"]
    torch.manual_seed(seed + 1)
    options = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    get_peft_model(base, options).save_pretrained(folder)


def run(args: list[str]) -> int:
    try:
        return cli(args)
    except SystemExit as exc:
        return int(exc.code)


def error_line(err: str, command: str) -> str:
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith(f"tensorlotr {command}: error: ")]
    assert len(errors) == 1, err
    return errors[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def adapters(zoo: Path) -> list[str]:
    return sorted(json.loads((zoo / "zoo_config.json").read_text())["adapters"])


@pytest.fixture(scope="module")
def loras(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("loras")
    for seed, name in enumerate(["la", "lb", "lc", "lr"]):
        write_lora(root / name, seed)
    write_lora(root / "bert", 0, "bert")
    write_lora(root / "gpt2", 0, "gpt2")
    return root


@pytest.fixture()
def zoo(loras: Path, tmp_path: Path) -> Path:
    assert run(["zoo", "compress", str(loras / "la"), str(loras / "lb"), str(tmp_path / "zoo"), "--json"]) == 0
    return tmp_path / "zoo"


# --- data lost ---------------------------------------------------------------------------------


def test_a_source_stored_inside_the_zoo_is_kept(zoo, loras, capsys):
    shutil.copytree(loras / "lc", zoo / "lc")
    before = snapshot(zoo / "lc")
    assert run(["zoo", "add", str(zoo), str(zoo / "lc"), "--json"]) == 0
    assert snapshot(zoo / "lc") == before  # the source, whole
    assert adapters(zoo) == ["la", "lb", "lc"]
    assert run(["zoo", "add", str(zoo), str(zoo / "lc"), "--name", "again", "--json"]) == 0  # still readable
    capsys.readouterr()


def test_zoo_add_keeps_the_other_files_of_the_zoo(zoo, loras, capsys):
    report = {"format": "tensorlotr-compression-report", "adapters": [{"adapter": "la", "output_error": 0.25}]}
    (zoo / "compression_report.json").write_text(json.dumps(report))
    (zoo / "NOTES.md").write_text("my notes")
    (zoo / "extra").mkdir()
    (zoo / "extra" / "x.txt").write_text("x")
    (zoo / "link").symlink_to("NOTES.md")
    os.chmod(zoo, 0o750)
    kept = {k: v for k, v in snapshot(zoo).items() if not k.startswith("zoo_")}
    assert run(["zoo", "add", str(zoo), str(loras / "lc"), "--json"]) == 0
    assert {k: v for k, v in snapshot(zoo).items() if not k.startswith("zoo_")} == kept
    assert os.readlink(zoo / "link") == "NOTES.md"
    assert oct(zoo.stat().st_mode & 0o777) == oct(0o750)
    capsys.readouterr()
    assert run(["inspect", str(zoo), "--json"]) == 0  # the report still serves inspect
    shown = {a["adapter"]: a["output_error"] for a in json.loads(capsys.readouterr().out)["adapters"]}
    assert shown == {"la": 0.25, "lb": None, "lc": None}
    # a refit changes every adapter: the report's errors no longer apply, and it says so
    assert run(["zoo", "add", str(zoo), str(loras / "lr"), "--refit", "--json"]) == 0
    notes = json.loads(capsys.readouterr().out)["notes"]
    assert any("removed compression_report.json" in n for n in notes)
    assert not (zoo / "compression_report.json").exists() and (zoo / "NOTES.md").read_text() == "my notes"


def test_zoo_add_refuses_a_zoo_holding_a_pipe(zoo, loras, capsys):
    os.mkfifo(zoo / "pipe")
    before = snapshot(zoo)
    assert run(["zoo", "add", str(zoo), str(loras / "lc"), "--json"]) == 2
    line = error_line(capsys.readouterr().err, "zoo")
    assert f"{(zoo / 'pipe').resolve()} is not a file, folder or link" in line
    assert snapshot(zoo) == before and sorted(p.name for p in zoo.parent.iterdir()) == ["zoo"]


#: A child: ``tensorlotr ARGS`` once ``go`` exists, each write of a zoo slowed by 0.3 s, so that two
#: children started together both read the zoo before either writes it.
CHILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path

    import tensorlotr.jobs.zoo.add as add
    import tensorlotr.jobs.zoo.compress as compress
    from tensorlotr.cli import main

    def slowed(write):
        def write_slowly(*args, **kwargs):
            time.sleep(0.3)
            return write(*args, **kwargs)

        return write_slowly

    add.write_zoo, compress.write_zoo = slowed(add.write_zoo), slowed(compress.write_zoo)
    ready, go = Path(sys.argv[1]), Path(sys.argv[2])
    ready.write_text("ready")
    while not go.exists():
        time.sleep(0.002)
    sys.exit(main(sys.argv[3:]))
    """
)


def _at_once(commands: list[list[str]], cwd: Path) -> list[tuple[int, str]]:
    go = cwd / "go"
    go.unlink(missing_ok=True)
    readies = [cwd / f"ready-{i}" for i in range(len(commands))]
    children = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, str(ready), str(go), *command],
            cwd=cwd,
            env=ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for ready, command in zip(readies, commands, strict=True)
    ]
    deadline = time.monotonic() + 240
    while not all(r.exists() for r in readies):
        assert time.monotonic() < deadline and all(c.poll() is None for c in children), "a child never got ready"
        time.sleep(0.02)
    for ready in readies:
        ready.unlink()
    go.write_text("go")
    done = [(c.wait(timeout=240), c.communicate()[1]) for c in children]
    go.unlink()
    return done


def test_two_zoo_adds_at_once_both_land(loras, tmp_path):
    for _ in range(3):
        zoo = tmp_path / "zoo"
        shutil.rmtree(zoo, ignore_errors=True)
        assert run(["zoo", "compress", str(loras / "la"), str(zoo), "--json"]) == 0
        done = _at_once([["zoo", "add", "zoo", str(loras / s), "--json"] for s in ("lc", "lr")], tmp_path)
        assert [code for code, _ in done] == [0, 0], done
        assert adapters(zoo) == ["la", "lc", "lr"]  # neither adapter lost
        assert sorted(p.name for p in tmp_path.iterdir()) == ["zoo"]  # no lock or temporary left
        assert run(["inspect", str(zoo), "--json"]) == 0


def test_zoo_add_and_a_forced_compress_at_once_leave_one_whole_zoo(loras, tmp_path):
    zoo = tmp_path / "zoo"
    assert run(["zoo", "compress", str(loras / "la"), str(zoo), "--json"]) == 0
    commands = [["zoo", "add", "zoo", str(loras / "lc"), "--json"], ["zoo", "compress", str(loras / "lb"), "zoo"]]
    done = _at_once([[*commands[0]], [*commands[1], "--force", "--json"]], tmp_path)
    assert [code for code, _ in done] == [0, 0], done
    assert adapters(zoo) in (["lb"], ["lb", "lc"])  # the compress last, or the add on the new zoo
    assert sorted(p.name for p in tmp_path.iterdir()) == ["zoo"]


def test_zoo_add_through_a_symbolic_link_updates_the_real_zoo(zoo, loras, capsys):
    link = zoo.parent / "link"
    link.symlink_to("zoo")
    chain = zoo.parent / "chain"
    chain.symlink_to("link")
    assert run(["zoo", "add", str(chain), str(loras / "lc"), "--json"]) == 0
    assert link.is_symlink() and chain.is_symlink() and os.readlink(link) == "zoo"
    assert adapters(zoo) == ["la", "lb", "lc"]
    loop = zoo.parent / "loop"
    loop.symlink_to("loop")
    assert run(["zoo", "add", str(loop), str(loras / "lr"), "--json"]) == 2
    assert "loop is a loop of symbolic links" in error_line(capsys.readouterr().err, "zoo")


def test_zoo_add_refuses_a_read_only_zoo(zoo, loras):
    os.chmod(zoo, 0o555)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "tensorlotr", "zoo", "add", str(zoo), str(loras / "lc")],
            env=ENV, capture_output=True, text=True, check=False, preexec_fn=_without_file_privileges,
        )  # fmt: skip
    finally:
        os.chmod(zoo, 0o755)
    assert done.returncode == 1, done.stderr
    assert f"{zoo} is read-only (mode 555); make it writable to update it" in error_line(done.stderr, "zoo")
    assert adapters(zoo) == ["la", "lb"]


def _without_file_privileges() -> None:
    """In the child: drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH, so even root obeys file modes."""
    if os.geteuid() != 0:
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2):
        if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


#: A child that replaces ``zoo`` in turn by the zoos ``A`` and ``B`` (other ranks) for 3 seconds.
SWAPPER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from tensorlotr.files.atomic import atomic_update
    from tensorlotr.io.zoo_format import read_zoo, write_zoo

    root = Path(sys.argv[1])
    zoos = [read_zoo(root / "A"), read_zoo(root / "B")]
    (root / "started").write_text("started")
    end, i = time.monotonic() + 3, 0
    while time.monotonic() < end:
        with atomic_update(root / "zoo", replaced=["zoo_config.json", "zoo_model.safetensors"]) as tmp:
            write_zoo(tmp, zoos[i % 2])  # a new version each time, as zoo add writes
        i += 1
    """
)


def test_a_zoo_replaced_while_it_is_read_is_read_whole(loras, tmp_path):
    from tensorlotr.io.zoo_format import read_zoo

    for name, rank in (("A", 2), ("B", 3)):
        assert run(["zoo", "compress", str(loras / "la"), str(loras / "lb"), str(tmp_path / name), "--rank",
                    str(rank), "--json"]) == 0  # fmt: skip
    shutil.copytree(tmp_path / "A", tmp_path / "zoo")
    swapper = subprocess.Popen([sys.executable, "-c", SWAPPER, str(tmp_path)], env=ENV)
    while not (tmp_path / "started").exists():
        assert swapper.poll() is None
        time.sleep(0.01)
    reads = 0
    while swapper.poll() is None:
        zoo = read_zoo(tmp_path / "zoo")  # never a config of one version with the weights of the other
        assert {g.rank for g in zoo.groups.values()} in ({(2, 2)}, {(3, 3)})
        reads += 1
    assert swapper.returncode == 0 and reads > 20


def test_the_base_models_name_is_no_adapter_name(zoo, loras, capsys):
    assert run(["zoo", "add", str(zoo), str(loras / "lc"), "--name", "__base__"]) == 2
    assert "adapter name '__base__' must be letters, digits, '_' or '-', and not '__base__'" in error_line(
        capsys.readouterr().err, "zoo"
    )
    config = json.loads((zoo / "zoo_config.json").read_text())
    config["adapters"]["__base__"] = config["adapters"].pop("lb")
    (zoo / "zoo_config.json").write_text(json.dumps(config))
    assert run(["inspect", str(zoo)]) == 2  # a mixed batch could never reach it
    assert "adapter name '__base__'" in error_line(capsys.readouterr().err, "inspect")


# --- wrong answers with exit code 0 ---------------------------------------------------------------


@pytest.mark.parametrize(("source", "flags"), [("bert", []), ("gpt2", ["--refit"])])
def test_zoo_add_refuses_an_adapter_of_another_base(source, flags, zoo, loras, capsys):
    before = snapshot(zoo)
    assert run(["zoo", "add", str(zoo), str(loras / source), *flags, "--json"]) == 2
    line = error_line(capsys.readouterr().err, "zoo")
    assert "does not fit the zoo" in line and "different base models" in line and source in line
    assert snapshot(zoo) == before


def _edit_tensor(zoo: Path, key_part: str, value: float) -> str:
    weights = zoo / "zoo_model.safetensors"
    tensors = load_file(weights)
    [key] = [k for k in sorted(tensors) if key_part in k][:1]
    tensors[key] = tensors[key].clone()
    tensors[key][0, 0] = value
    save_file(tensors, weights, metadata={"format": "pt"})
    return key


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_a_zoo_with_a_non_finite_core_is_refused_everywhere(value, zoo, tmp_path, capsys):
    key = _edit_tensor(zoo, "adapters.lb.cores.", value)
    with pytest.raises(ValueError, match=f"tensor '{key}' contains NaN or Inf"):
        tlr.LoTRModel.from_pretrained(tiny_llama(), zoo)
    assert run(["inspect", str(zoo)]) == 2
    assert f"tensor '{key}' contains NaN or Inf" in error_line(capsys.readouterr().err, "inspect")
    assert run(["export-lora", str(zoo), str(tmp_path / "ex"), "--adapter", "la"]) == 2
    assert "contains NaN or Inf" in error_line(capsys.readouterr().err, "export-lora")


@pytest.mark.parametrize("scale", [math.nan, "x", 2.0, True])
def test_a_zoo_group_scale_must_be_one(scale, zoo, capsys):
    config = json.loads((zoo / "zoo_config.json").read_text())
    config["groups"]["q_proj"]["scale"] = scale
    (zoo / "zoo_config.json").write_text(json.dumps(config))
    assert run(["inspect", str(zoo)]) == 2
    line = error_line(capsys.readouterr().err, "inspect")
    assert "zoo_config.json: group 'q_proj': 'scale' must be" in line


@pytest.mark.parametrize("flags", [["--rank", "3"], ["--energy", "0.9"], ["--hooi-iters", "2"]])
def test_zoo_add_rank_energy_and_sweeps_need_refit(flags, zoo, loras, capsys):
    before = snapshot(zoo)
    assert run(["zoo", "add", str(zoo), str(loras / "lc"), *flags, "--json"]) == 2
    assert "apply to a refit only (--refit)" in error_line(capsys.readouterr().err, "zoo")
    assert snapshot(zoo) == before
    assert run(["zoo", "add", str(zoo), str(loras / "lc"), *flags, "--refit", "--json"]) == 0  # with --refit: used
    if flags[0] == "--rank":
        assert {tuple(g["rank"]) for g in json.loads((zoo / "zoo_config.json").read_text())["groups"].values()} == {
            (3, 3)
        }


# --- messages that name the culprit -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.update(format_version="1"), "has format version '1'; this reads integers up to 2"),
        (lambda d: d.update(format_version=None), "has format version None"),
        (lambda d: d.update(format_version=1.0), "has format version 1.0"),
        (lambda d: d.update(format_version=True), "has format version True"),
        (lambda d: d.update(format_version=3), "has format version 3"),
        (lambda d: d.update(groups=[]), "'groups' must be a non-empty object of group layouts, got []"),
        (lambda d: d.update(adapters=[]), "'adapters' must be a non-empty object of adapters, got []"),
        (lambda d: d["adapters"]["la"].update(source=5), "adapter 'la': 'source' must be a string"),
        (lambda d: d["adapters"]["la"].update(groups=["q_proj"]), "adapter 'la': 'groups' must map groups"),
        (lambda d: d["adapters"]["la"].update(lora_params="x"), "adapter 'la': 'lora_params' must be a whole"),
        (lambda d: d["adapters"]["la"].update(relative_error="x"), "'relative_error' must be a finite number"),
        (lambda d: d["adapters"].update({"a.b": d["adapters"]["la"]}), "adapter name 'a.b' must be letters"),
        (lambda d: d.update(base_model=[1]), "'base_model' must be an object"),
    ],
)
def test_malformed_zoo_configs_are_one_line_errors(edit, message, zoo, capsys):
    config = json.loads((zoo / "zoo_config.json").read_text())
    edit(config)
    (zoo / "zoo_config.json").write_text(json.dumps(config))
    for args in (["inspect", str(zoo)], ["zoo", "add", str(zoo), str(zoo.parent / "none")]):
        assert run(args) == 2
        line = error_line(capsys.readouterr().err, args[0])
        assert f"{zoo}/zoo_config.json" in line and message in line, line


def test_export_lora_of_an_adapter_the_zoo_lacks_is_bad_input(zoo, tmp_path, capsys):
    assert run(["export-lora", str(zoo), str(tmp_path / "ex"), "--adapter", "nope"]) == 2
    line = error_line(capsys.readouterr().err, "export-lora")
    assert f"the zoo {zoo} has no adapter 'nope'; its adapters: la, lb" in line
    assert not (tmp_path / "ex").exists()


def test_inspect_of_a_zoo_writes_nothing_and_does_not_say_it_did(zoo, capsys):
    before = snapshot(zoo)
    assert run(["inspect", str(zoo)]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"{zoo}: LoTR zoo") and "wrote" not in text
    assert run(["inspect", str(zoo), "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["output"] is None and document["path"] == str(zoo)
    assert snapshot(zoo) == before
