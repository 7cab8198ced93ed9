"""The driver shared by convert and decompose (jobs/driver.py): run_plan, save_adapter, the adapter report."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from tensorlotr.adapter import AdapterBuilder, Group
from tensorlotr.core import relative_error, tucker2
from tensorlotr.io import read_adapter
from tensorlotr.jobs.driver import AdapterReport, GroupOutcome, GroupReport, PlanResult, run_plan, save_adapter

#: Two groups of planted stacks: query (3 layers of 6x5), value (2 layers of 4x7).
SHAPES = {"query": (3, 6, 5), "value": (2, 4, 7)}


def stacks(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(shape) for name, shape in SHAPES.items()}


def plan() -> list[Group]:
    return [
        Group(name, tuple(f"layers.{i}.{name}" for i in range(n)), (d_out, d_in))
        for name, (n, d_out, d_in) in SHAPES.items()
    ]


def decomposer(data: dict[str, np.ndarray], rank: tuple[int, int], **details):
    """A job's per-group step: the dense Tucker-2 of the group's stack, its norm and its exact error."""

    def decompose_group(group: Group) -> GroupOutcome:
        stack = data[group.name]
        tucker = tucker2(stack, rank)
        norm_sq = float((stack**2).sum())
        return GroupOutcome(tucker, norm_sq, relative_error(tucker, stack) ** 2 * norm_sq, details=dict(details))

    return decompose_group


def report_row(**fields) -> GroupReport:
    values = dict(group="query", layers=3, shape=(6, 5), rank=(2, 2), lotr_params=40, relative_error=0.5, seconds=0.25)
    return GroupReport(**{**values, **fields})


# --- run_plan --------------------------------------------------------------------------------


def test_run_plan_reports_every_group_and_the_total_error():
    data = stacks()
    done = run_plan(plan(), decomposer(data, (2, 3), route="dense"), rank=(2, 3))
    assert isinstance(done, PlanResult)
    assert [g.group for g in done.groups] == ["query", "value"]
    query, value = done.groups
    assert (query.layers, query.shape, query.rank) == (3, (6, 5), (2, 3))
    assert (value.layers, value.shape, value.rank) == (2, (4, 7), (2, 3))
    assert query.lotr_params == 6 * 2 + 5 * 3 + 3 * 2 * 3 and value.lotr_params == 4 * 2 + 7 * 3 + 2 * 2 * 3
    assert query.route == value.route == "dense"  # the job's details become report columns
    assert all(g.seconds >= 0 for g in done.groups) and done.notes == []
    for row in done.groups:
        stack = data[row.group]
        assert row.relative_error == pytest.approx(relative_error(tucker2(stack, (2, 3)), stack), rel=1e-12)
    # the total is over all groups, weighted by their norms: not the mean of the groups' errors
    norms = {name: float((stack**2).sum()) for name, stack in data.items()}
    errors = {g.group: g.relative_error**2 * norms[g.group] for g in done.groups}
    assert done.norm_sq == pytest.approx(sum(norms.values()))
    assert done.relative_error == pytest.approx(math.sqrt(sum(errors.values()) / sum(norms.values())), rel=1e-12)
    assert done.relative_error != pytest.approx((query.relative_error + value.relative_error) / 2)


def test_run_plan_stores_each_group_in_the_builder():
    data = stacks()
    done = run_plan(plan(), decomposer(data, (2, 3)))
    files = done.builder.build(["query", "value"], "by_name", [], {})
    for name, stack in data.items():
        expected = tucker2(stack, (2, 3))
        assert files.groups[name].modules == [f"layers.{i}.{name}" for i in range(len(stack))]
        assert files.groups[name].rank == (2, 3) and files.groups[name].scale == 1.0
        torch.testing.assert_close(
            files.tucker(name).to_dense(), torch.as_tensor(expected.to_dense()), atol=1e-5, rtol=0
        )  # stored in float32


def test_run_plan_notes_groups_kept_below_the_rank_asked_for_and_shows_progress():
    seen = []

    def progress(items, desc, total):
        seen.append((desc, total))
        return items

    done = run_plan(plan(), decomposer(stacks(), (5, 5)), rank=(5, 5), progress=progress, desc="stacks")
    assert seen == [("stacks", 2)]
    # value: 2 layers of 4x7, so r_out <= 4 and r_in <= min(7, 2 * 4); query: 5 <= min(6, 3 * 5), 5 <= 5
    assert [g.rank for g in done.groups] == [(5, 5), (4, 5)]
    assert done.notes == ["group value: rank 5x5 is above its exact rank; kept 4x5"]


def test_run_plan_zero_updates_and_non_finite_errors_count_as_exact():
    zero = {name: np.zeros(shape) for name, shape in SHAPES.items()}
    done = run_plan(plan(), decomposer(zero, (1, 1)))
    assert done.norm_sq == 0.0 and done.relative_error == 0.0
    assert all(g.relative_error == 0.0 for g in done.groups)

    def nan_error(group: Group) -> GroupOutcome:
        return GroupOutcome(tucker2(stacks()[group.name], (1, 1)), norm_sq=4.0, error_sq=float("nan"))

    done = run_plan(plan(), nan_error)
    assert done.error_sq == 0.0 and done.relative_error == 0.0 and all(g.relative_error == 0.0 for g in done.groups)


def test_plan_result_relative_error():
    assert PlanResult(AdapterBuilder(), [], norm_sq=9.0, error_sq=1.0).relative_error == pytest.approx(1 / 3)
    assert PlanResult(AdapterBuilder(), [], norm_sq=0.0, error_sq=0.0).relative_error == 0.0


# --- save_adapter --------------------------------------------------------------------------------


def test_save_adapter_writes_the_folder_and_its_documents(tmp_path):
    done = run_plan(plan(), decomposer(stacks(), (2, 3)))
    files = done.builder.build(["query", "value"], "by_name", [], {})
    save_adapter(files, tmp_path / "out", force=False, documents={"report.json": {"rank": (2, 3), "x": float("inf")}})
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "lotr_config.json",
        "lotr_model.safetensors",
        "report.json",
    ]
    assert json.loads((tmp_path / "out" / "report.json").read_text()) == {"rank": [2, 3], "x": "inf"}
    again = read_adapter(tmp_path / "out")
    assert {name: again.groups[name].rank for name in SHAPES} == {"query": (2, 3), "value": (2, 3)}
    for key, tensor in files.tensors.items():
        torch.testing.assert_close(again.tensors[key], tensor, atol=0, rtol=0)


def test_save_adapter_refuses_an_existing_folder_unless_forced_and_none_writes_nothing(tmp_path):
    files = run_plan(plan(), decomposer(stacks(), (2, 3))).builder.build(["query"], "by_name", [], {})
    save_adapter(files, None, force=False)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    with pytest.raises(FileExistsError, match="already exists"):
        save_adapter(files, tmp_path / "out", force=False)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["old.txt"]
    save_adapter(files, tmp_path / "out", force=True)
    assert not (tmp_path / "out" / "old.txt").exists() and read_adapter(tmp_path / "out").groups["query"].rank == (2, 3)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder left


# --- AdapterReport ---------------------------------------------------------------------------------


def test_adapter_report_totals_with_and_without_lora():
    rows = [
        report_row(lora_params=1000, lotr_params=40),
        report_row(group="value", lora_params=600, lotr_params=60, relative_error=0.1),
    ]
    report = AdapterReport(source="lora", output="out", groups=rows, relative_error=0.3, output_error=0.2)
    assert report.lotr_params == 100 and report.lora_params == 1600
    assert report.totals() == {
        "lotr_params": 100,
        "relative_error": 0.3,
        "output_error": 0.2,
        "lora_params": 1600,
        "compression": 16.0,
    }
    plain = AdapterReport(source="base", output=None, groups=[report_row()], relative_error=0.5)
    assert plain.lora_params == 0
    assert plain.totals() == {"lotr_params": 40, "relative_error": 0.5}  # no LoRA: no compression, no output error


def test_adapter_report_json_holds_fields_and_totals_but_not_the_adapter():
    files = run_plan(plan(), decomposer(stacks(), (2, 3))).builder.build(["query"], "by_name", [], {})
    report = AdapterReport(
        source="lora", output=None, groups=[report_row(lora_rank=(4, 4), lora_params=800)], notes=["a note"],
        adapter=files,
    )  # fmt: skip
    document = json.loads(report.to_json())
    assert document == json.loads(json.dumps(report.to_dict()))
    assert "adapter" not in document
    assert document["totals"] == {"lotr_params": 40, "relative_error": 0.0, "lora_params": 800, "compression": 20.0}
    assert document["groups"][0]["shape"] == [6, 5] and document["groups"][0]["lora_rank"] == [4, 4]
    assert document["groups"][0]["output_error"] is None and document["notes"] == ["a note"]
    assert report["source"] == "lora"  # indexing reads to_dict()


def test_adapter_report_text_shows_used_columns_a_total_row_notes_and_a_summary():
    rows = [
        report_row(lora_params=1000, lotr_params=40, route="exact"),
        report_row(group="value", layers=2, lora_params=600, lotr_params=60, relative_error=0.1, route="randomized"),
    ]
    report = AdapterReport(
        source="lora", output="out", groups=rows, relative_error=0.3, seconds=1.5, notes=["group value: kept 2x2"]
    )
    lines = report.text().splitlines()
    header = lines[0].split()
    assert header[:4] == ["group", "layers", "shape", "LoTR"] and "route" in header
    assert "energy" not in lines[0] and "output" not in lines[0]  # columns no group fills are left out
    total = next(line for line in lines if line.startswith("total"))
    assert total.split()[:2] == ["total", "5"] and "1,600" in total and "100" in total and "0.3000" in total
    assert lines[-2] == "group value: kept 2x2"
    assert lines[-1] == (
        "1,600 LoRA params -> 100 LoTR params (compression 16.0x), relative error 3.000e-01, 1.50 s; wrote out"
    )
    assert str(report) == report.text()
    calibrated = AdapterReport(source="base", output=None, groups=[report_row()], relative_error=0.5, output_error=0.25)
    assert calibrated.summary() == "40 LoTR params, relative error 5.000e-01, calibrated output error 2.500e-01, 0.00 s"
