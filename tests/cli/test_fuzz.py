"""Hypothesis fuzz of what ``tensorlotr convert`` reads: ``adapter_config.json`` and the safetensors bytes.

Whatever the bytes, the command ends in exit code 0 with a complete output, or in exit code
2 with one error line and nothing written: never a traceback, never partial output.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
from builders import run, write_lora
from hypothesis import given
from hypothesis import strategies as st

from tensorlotr.io.lotr_format import read_adapter

SAFETENSORS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("fuzz") / "lora"
    write_lora(folder, r=2)
    return folder


def convert_with(source: Path, name: str, data: bytes) -> None:
    """Convert a copy of ``source`` whose file ``name`` holds ``data``; check the outcome."""
    with tempfile.TemporaryDirectory() as work:
        folder = Path(work) / "lora"
        shutil.copytree(source, folder)
        (folder / name).write_bytes(data)
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = run(["convert", str(folder), str(Path(work) / "out"), "--json"])
        err_text = err.getvalue()
        assert "Traceback" not in err_text, err_text
        assert all(line.startswith("tensorlotr convert: ") for line in err_text.splitlines()), err_text
        if code == 0:
            read_adapter(Path(work) / "out")  # complete and consistent
            return
        assert code == 2, err_text
        assert sum(": error: " in line for line in err_text.splitlines()) == 1, err_text
        assert sorted(p.name for p in Path(work).iterdir()) == ["lora"]  # no output, no temporary folder


# --- adapter_config.json ----------------------------------------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=12), inner, max_size=3),
    max_leaves=8,
)
#: Values that PEFT's fields meet in practice, right and wrong.
TYPICAL = st.sampled_from(
    [
        "LORA", "IA3", 0, 1, 2, 4, 8, -1, 2.5, 1e309, float("nan"), "four", True, None, "q_proj", ".*", "(",
        "all-linear", ["q_proj"], ["k_proj"], ["q_proj", "v_proj"], [], [""], {"q_proj": 1}, {"(": 2},
        {"v_proj": 0}, {"q_proj": "x"}, ["lm_head"],
    ]
)  # fmt: skip
FIELDS = st.sampled_from(
    [
        "peft_type", "target_modules", "r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora",
        "fan_in_fan_out", "modules_to_save", "use_dora", "lora_bias", "layers_to_transform",
    ]
)  # fmt: skip


def config_bytes(valid: dict) -> st.SearchStrategy[bytes]:
    """Whole documents, valid configs with some fields changed or removed, other encodings, raw bytes."""
    changed = st.dictionaries(FIELDS, TYPICAL | JSON, min_size=1, max_size=4).map(lambda new: {**valid, **new})
    removed = st.sets(FIELDS, min_size=1, max_size=3).map(
        lambda gone: {k: v for k, v in valid.items() if k not in gone}
    )
    documents = JSON | changed | removed
    encoded = st.tuples(documents, st.sampled_from(["utf-8", "utf-16", "utf-8-sig", "latin-1"])).map(
        lambda pair: json.dumps(pair[0]).encode(pair[1], errors="replace")
    )
    return encoded | st.binary(max_size=200)


@given(data=st.data())
def test_fuzzed_adapter_config(source, data):
    valid = json.loads((source / CONFIG).read_text())
    convert_with(source, CONFIG, data.draw(config_bytes(valid)))


# --- adapter_model.safetensors ----------------------------------------------------------------


def _edit_header(raw: bytes, edit: Callable[[dict], None]) -> bytes:
    """``raw`` with its JSON header changed by ``edit`` (the tensor bytes kept as they are)."""
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + size])
    edit(header)
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + raw[8 + size :]


def _set(key: str, field: str, value: object) -> Callable[[dict], None]:
    def edit(header: dict) -> None:
        header[key][field] = value

    return edit


def safetensors_bytes(raw: bytes) -> st.SearchStrategy[bytes]:
    """Truncations, overwritten bytes, extreme values, header fields changed (dtype, shape, offsets, keys), raw bytes.

    The tensors of ``raw`` are float32, as ``write_lora`` writes them.
    """
    size = int.from_bytes(raw[:8], "little")
    keys = sorted(k for k in json.loads(raw[8 : 8 + size]) if k != "__metadata__")
    truncated = st.integers(0, len(raw) - 1).map(lambda n: raw[:n])

    def overwrite(changes: list[tuple[int, int]]) -> bytes:
        data = bytearray(raw)
        for position, value in changes:
            data[position] = value
        return bytes(data)

    overwritten = st.lists(st.tuples(st.integers(0, len(raw) - 1), st.integers(0, 255)), min_size=1, max_size=6)
    start, count = 8 + size, (len(raw) - 8 - size) // 4
    extreme = st.sampled_from([3e38, -3e38, 1e30, 1e19, float("nan"), float("inf"), 1e-45, 0.0])
    poked = st.lists(st.tuples(st.integers(0, count - 1), extreme), min_size=1, max_size=4).map(
        lambda values: overwrite(
            [(start + 4 * i + j, b) for i, v in values for j, b in enumerate(struct.pack("<f", v))]
        )
    )
    field_values = {
        "dtype": st.sampled_from(["F32", "F16", "BF16", "F64", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2", "I64", "X"]),
        "shape": st.lists(st.integers(-1, 40), max_size=4),
        "data_offsets": st.lists(st.integers(-1, len(raw) + 10), min_size=2, max_size=2),
    }
    header_edits = st.sampled_from(keys).flatmap(
        lambda key: st.sampled_from(sorted(field_values)).flatmap(
            lambda field: field_values[field].map(lambda value: _set(key, field, value))
        )
    )
    renamed = st.tuples(st.sampled_from(keys), st.text(max_size=60)).map(
        lambda pair: lambda header: header.__setitem__(pair[1], header.pop(pair[0]))
    )
    edited = (header_edits | renamed).map(lambda edit: _edit_header(raw, edit))
    return truncated | overwritten.map(overwrite) | poked | edited | st.binary(max_size=300)


@given(data=st.data())
def test_fuzzed_safetensors_bytes(source, data):
    raw = (source / SAFETENSORS).read_bytes()
    convert_with(source, SAFETENSORS, data.draw(safetensors_bytes(raw)))
