"""The package root (tensorlotr/__init__.py): its public names, loaded on first use, and the old module paths."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

import tensorlotr as tlr


def test_every_public_name_resolves_and_is_listed():
    for name in tlr.__all__:
        assert getattr(tlr, name) is not None, name
    assert set(tlr.__all__) <= set(dir(tlr))
    assert tlr.LoTRModel is importlib.import_module("tensorlotr.nn").LoTRModel
    assert tlr.convert_lora is importlib.import_module("tensorlotr.jobs.convert").convert_lora
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        tlr.nothing_here  # noqa: B018


@pytest.mark.parametrize(("old", "new"), sorted(tlr.MOVED_MODULES.items()))
def test_an_old_module_path_is_the_module_at_its_new_path(old, new):
    assert importlib.import_module(old) is importlib.import_module(new)


def test_an_old_path_loads_only_when_imported():
    code = (
        "import sys, tensorlotr\n"
        "before = 'tensorlotr.jobs.convert' in sys.modules\n"
        "from tensorlotr.convert import convert_lora\n"
        "import tensorlotr.jobs.convert as new\n"
        "print(before, convert_lora is new.convert_lora, sys.modules['tensorlotr.convert'] is new)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["False", "True", "True"]
