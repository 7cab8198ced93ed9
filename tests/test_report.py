"""The one result type (report.py): Result's dict, JSON and text, the table cells, the table, the JSON writer."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest
from builders import peft_variant

import tensorlotr as tlr
from tensorlotr.jobs.inspect import inspect_adapter
from tensorlotr.report import Result, format_table, format_value, to_json


@dataclass
class Part:
    name: str
    rank: tuple[int, int]


@dataclass
class Sample(Result):
    """A job result with a nested dataclass, tuples, a non-string key and a field kept out of JSON."""

    parts: list[Part]
    shape: tuple[int, int]
    by_layer: dict[int, float]
    error: float = 0.0
    held: object = field(default=None, metadata={"json": False})

    def text(self) -> str:
        return format_table([{"part": p.name, "rank": p.rank} for p in self.parts])


def sample(**fields) -> Sample:
    values = dict(parts=[Part("query", (8, 4)), Part("value", (2, 2))], shape=(384, 384), by_layer={0: 0.5, 1: 0.25})
    return Sample(**{**values, **fields})


def test_to_dict_is_plain_json_data_without_the_fields_kept_out():
    result = sample(held=object())
    assert result.to_dict() == {
        "parts": [{"name": "query", "rank": [8, 4]}, {"name": "value", "rank": [2, 2]}],
        "shape": [384, 384],
        "by_layer": {"0": 0.5, "1": 0.25},
        "error": 0.0,
    }
    assert result["shape"] == [384, 384] and result["parts"][1]["name"] == "value"
    with pytest.raises(KeyError):
        result["held"]


def test_to_json_and_text_render_the_same_result():
    result = sample(error=float("nan"))
    document = json.loads(result.to_json())
    assert document["error"] == "nan"  # not the invalid JSON token NaN
    assert document["parts"] == result.to_dict()["parts"]
    assert result.to_json().startswith("{\n  ")  # indented
    assert str(result) == result.text() == "part   rank\n-----  ----\nquery  8x4\nvalue  2x2"


def test_a_result_must_write_its_text():
    @dataclass
    class Bare(Result):
        value: int

    assert Bare(3).to_dict() == {"value": 3}
    with pytest.raises(NotImplementedError):
        Bare(3).text()


@pytest.mark.parametrize(
    ("value", "cell"),
    [
        (True, "yes"),
        (False, "no"),
        (0, "0"),
        (1234567, "1,234,567"),
        (-4096, "-4,096"),
        (0.5, "0.5000"),
        (0.0, "0.0000"),
        (0.00012, "1.200e-04"),
        (2.5e6, "2.500e+06"),
        (-0.001, "-0.0010"),
        (float("nan"), "nan"),
        (float("-inf"), "-inf"),
        ((384, 384), "384x384"),
        ([8, 4, 2], "8x4x2"),
        (None, "None"),
        ("query", "query"),
    ],
)
def test_format_value(value, cell):
    assert format_value(value) == cell


def test_format_table_aligns_text_left_and_numbers_right():
    rows = [{"group": "q", "params": 6528, "error": 0.5}, {"group": "value", "params": 12, "error": 1e-5}]
    assert format_table(rows).splitlines() == [
        "group  params      error",
        "-----  ------  ---------",
        "q       6,528     0.5000",
        "value      12  1.000e-05",
    ]
    # columns chosen and ordered; a missing cell is empty and makes the column text, left-aligned
    assert format_table([{"a": 1, "b": "x"}, {"b": "yy"}], columns=["b", "a"]).splitlines() == [
        "b   a",
        "--  -",
        "x   1",
        "yy",
    ]
    assert format_table([]) == "(empty)"


def test_to_json_cleans_tuples_keys_and_non_finite_floats():
    document = {"rank": (8, 8), 3: [float("inf"), {"x": (1, float("nan"))}], "ok": 1.5}
    assert json.loads(to_json(document)) == {"rank": [8, 8], "3": ["inf", {"x": [1, "nan"]}], "ok": 1.5}
    assert to_json([1, 2]) == "[\n  1,\n  2\n]"


def test_every_job_result_renders_as_text_and_json(tmp_path):
    peft_variant("llama", tmp_path / "peft")
    results = [
        tlr.convert_lora(tmp_path / "peft", tmp_path / "lotr", rank=2),
        tlr.export_lora(tmp_path / "lotr", tmp_path / "lora"),
        inspect_adapter(tmp_path / "lotr"),
        inspect_adapter(tmp_path / "peft"),
    ]
    for result in results:
        assert isinstance(result, Result)
        assert result.text() and json.loads(result.to_json()) == json.loads(json.dumps(result.to_dict()))
