"""LoTR registers with PEFT however PEFT is reached: after ``import tensorlotr``, in fresh and spawned processes."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from builders import REPO, lotr_registered_here, randomise_peft_cores, skip_unless_lotr_peft, tiny_llama, token_ids
from peft import get_peft_model
from peft import mapping as peft_mapping

skip_unless_lotr_peft()

from tensorlotr.peft import LOTR, PEFT_VERSIONS, LoTRPeftConfig, LoTRTuner, UnsupportedPeftVersionError, register  # noqa: E402
from tensorlotr.peft.registration import is_registered  # noqa: E402
from tensorlotr.peft.support import check_peft_version, peft_version, peft_version_problem  # noqa: E402

TESTS = os.path.dirname(os.path.dirname(__file__))  # builders.py


def run(code: str, root=None) -> str:
    """Run ``code`` in a fresh interpreter (offline, this checkout first on the path, ``ROOT`` the folder ``root``);
    return its stdout."""
    code = f"ROOT = {str(root)!r}\n" + textwrap.dedent(code)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": f"{REPO}{os.pathsep}{TESTS}"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A base model folder, a LoTR adapter of it saved by PEFT, and the adapter's logits."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("registration")
    tiny_llama().save_pretrained(root / "base")
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(root / "base"),
        LoTRPeftConfig(rank=(4, 2), target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    randomise_peft_cores(model)
    model.save_pretrained(root / "adapter")
    model.eval()
    with torch.no_grad():
        torch.save(model(input_ids=token_ids()).logits, root / "logits.pt")
    return root


def test_import_tensorlotr_stays_light_and_registers_when_peft_is_imported():
    out = run(
        """
        import sys, warnings
        import tensorlotr
        assert "peft" not in sys.modules and "torch" not in sys.modules, "import tensorlotr loaded peft or torch"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import peft
        assert not [w for w in caught if "tensorlotr" in str(w.message)], [str(w.message) for w in caught]
        from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
        print(PEFT_TYPE_TO_CONFIG_MAPPING["LOTR"].__name__, PEFT_TYPE_TO_TUNER_MAPPING["LOTR"].__name__)
        import importlib.util, inspect
        assert importlib.util.find_spec("peft") is not None and "PeftModel" in inspect.getsource(peft)
        """
    )
    assert out.split() == ["LoTRPeftConfig", "LoTRTuner"]


def test_a_saved_adapter_loads_in_a_fresh_process_through_both_loaders(saved):
    out = run(
        """
        import peft  # PEFT first, then tensorlotr: it registers on import
        import tensorlotr
        import torch
        from peft import AutoPeftModelForCausalLM, PeftModel
        from transformers import AutoModelForCausalLM
        from builders import token_ids

        expected = torch.load(ROOT + "/logits.pt")
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(ROOT + "/base"), ROOT + "/adapter")
        auto = AutoPeftModelForCausalLM.from_pretrained(ROOT + "/adapter")
        for loaded in (model, auto):
            with torch.no_grad():
                assert torch.equal(loaded.eval()(input_ids=token_ids()).logits, expected)
        print(type(model.base_model).__name__, type(auto).__name__)
        """,
        saved,
    )
    assert out.split() == ["LoTRTuner", "PeftModelForCausalLM"]


def test_an_unsupported_peft_refuses_lotr_clearly_and_nothing_else(saved):
    out = run(
        """
        import peft
        peft.__version__ = "0.20.0"  # as if an older PEFT were installed
        import tensorlotr  # registers nothing, warns nothing: tensorlotr's LoRA tools do not need LoTR in PEFT
        from transformers import AutoModelForCausalLM
        from peft import PeftModel
        try:
            import tensorlotr.peft
        except ImportError as exc:
            print(type(exc).__name__, "|", exc)
        try:
            PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(ROOT + "/base"), ROOT + "/adapter")
        except ImportError as exc:
            print(type(exc).__name__, "|", exc)
        """,
        saved,
    )
    first, second = out.strip().splitlines()
    assert first == (
        f"UnsupportedPeftVersionError | tensorlotr's LoTR PEFT method needs peft{PEFT_VERSIONS}, but peft 0.20.0 is "
        "installed: pip install 'tensorlotr[peft]'"
    )
    assert second.startswith("UnsupportedPeftVersionError | this adapter is a LoTR adapter (peft_type LOTR); ")


def test_a_spawned_process_that_receives_a_config_has_lotr_registered():
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        assert pool.apply(lotr_registered_here, (LoTRPeftConfig(rank=2),)) == ("LoTRPeftConfig", "LOTR")


def test_register_is_idempotent_and_refuses_a_foreign_lotr(monkeypatch):
    register()
    register()
    assert is_registered() and peft_mapping.PEFT_TYPE_TO_PREFIX_MAPPING[LOTR] == "lotr_"
    monkeypatch.setitem(peft_mapping.PEFT_TYPE_TO_TUNER_MAPPING, LOTR, get_peft_model)
    with pytest.raises(RuntimeError, match="PEFT already has a method with peft_type 'LOTR'"):
        register()
    monkeypatch.setitem(peft_mapping.PEFT_TYPE_TO_TUNER_MAPPING, LOTR, LoTRTuner)
    monkeypatch.setitem(peft_mapping.PEFT_TYPE_TO_PREFIX_MAPPING, "OTHER", "lotr_")
    with pytest.raises(RuntimeError, match="'OTHER' already uses the parameter prefix 'lotr_'"):
        register()


def test_the_supported_versions():
    assert peft_version_problem() is None, f"the installed peft {peft_version()} is outside {PEFT_VERSIONS}"
    for version in ("0.21.0", "0.21.2", "0.21.9.dev0"):
        check_peft_version(version)
    for version in ("0.17.1", "0.20.0", "0.22.0.dev0", "0.22.0", "1.0.0"):
        with pytest.raises(UnsupportedPeftVersionError, match=f"needs peft{PEFT_VERSIONS}, but peft {version} is"):
            check_peft_version(version)


def test_the_peft_extra_pins_the_supported_versions():
    import tomllib

    with open(os.path.join(REPO, "pyproject.toml"), "rb") as file:
        extras = tomllib.load(file)["project"]["optional-dependencies"]
    assert extras["peft"] == [f"peft{PEFT_VERSIONS}"]
