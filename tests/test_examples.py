"""The examples run as documented."""

from __future__ import annotations

import re
import subprocess
import sys

from models import REPO


def test_lora_roundtrip_example(tmp_path):
    done = subprocess.run(
        [sys.executable, str(REPO / "examples" / "lora_roundtrip.py"), "--workdir", str(tmp_path)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    diffs = [float(x) for x in re.findall(r"max \|logit difference\|: ([0-9.e+-]+)", done.stdout)]
    assert len(diffs) == 2 and max(diffs) < 1e-5
    assert (tmp_path / "exported" / "adapter_config.json").is_file()
