"""The logs job (jobs/logs.py): TensorBoard trees to parquet, on event files written by torch's SummaryWriter."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pandas as pd
import pytest
from builders import error_line, run
from torch.utils.tensorboard import SummaryWriter

from tensorlotr.cli import main as cli
from tensorlotr.jobs.logs import EventFileWarning, check_event_file, read_logs, tb2parquet

NAMES = ["dataset", "model", "method", "lr", "rank", "seed"]


TAGS = ["loss", "eval/acc", "lr"]


STEPS = 7


def value(run: int, tag: int, step: int) -> float:
    return float(np.float32(np.sin(1 + run * 7.1 + tag * 3.3 + step * 0.37) * 10 ** (tag - 1)))


@pytest.fixture()
def tree(tmp_path):
    """glue/<model>/<method>/<lr>/<rank>/<seed>/ with 3 tags x 7 steps per run."""
    runs = []
    for model in ("roberta", "gpt2"):
        for lr in ("1e-05", "0.0003"):
            for rank in (8, 16):
                for seed in (0, 1):
                    runs.append(("glue", model, "lotr", lr, str(rank), str(seed)))
    for r, parts in enumerate(runs):
        writer = SummaryWriter(str(tmp_path.joinpath("logs", *parts)))
        for step in range(STEPS):
            for t, tag in enumerate(TAGS):
                writer.add_scalar(tag, value(r, t, step), step)
        writer.close()
    return tmp_path / "logs", runs


def test_rows_values_dtypes_and_index(tree):
    root, runs = tree
    frame = read_logs(root, NAMES)
    assert len(frame) == len(runs) * len(TAGS) * STEPS
    assert list(frame.index.names) == ["dataset", "model", "method", "lr", "rank", "tag", "step", "seed"]
    assert frame.index.is_monotonic_increasing
    flat = frame.reset_index()
    assert flat["lr"].dtype == np.float64 and set(flat["lr"]) == {1e-05, 0.0003}  # exact, not 1.0000000000000001e-05
    assert flat["rank"].dtype == np.int64 and flat["seed"].dtype == np.int64
    assert flat["model"].dtype == "category" and flat["tag"].dtype == "category"
    assert flat["value"].dtype == np.float32
    for r, parts in enumerate(runs):
        for t, tag in enumerate(TAGS):
            got = frame.loc[(parts[0], parts[1], parts[2], float(parts[3]), int(parts[4]), tag), :]
            got = got.xs(int(parts[5]), level="seed")["value"].to_numpy()
            expected = np.array([value(r, t, s) for s in range(STEPS)], dtype=np.float32)
            np.testing.assert_array_equal(got, expected)  # bit-exact round trip


def test_parquet_round_trip_and_cli(tree, tmp_path, capsys):
    root, runs = tree
    out = tmp_path / "sweep.parquet"
    assert cli(["tb2parquet", str(root), str(out), "--names", *NAMES, "--jobs", "2", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["runs"] == len(runs) and summary["rows"] == len(runs) * len(TAGS) * STEPS and summary["tags"] == 3
    frame = pd.read_parquet(out)
    pd.testing.assert_frame_equal(frame, read_logs(root, NAMES), check_categorical=False)
    import pyarrow.parquet as pq

    assert pq.ParquetFile(out).metadata.row_group(0).column(0).compression == "ZSTD"
    assert cli(["tb2parquet", str(root), str(out), "--names", *NAMES]) == 2
    assert "already exists" in capsys.readouterr().err
    assert cli(["tb2parquet", str(root), str(out), "--names", *NAMES, "--tags", "^eval/", "--force"]) == 0
    assert set(pd.read_parquet(out).index.get_level_values("tag")) == {"eval/acc"}


def test_parallel_equals_sequential(tree):
    root, _ = tree
    pd.testing.assert_frame_equal(read_logs(root, NAMES, jobs=2), read_logs(root, NAMES, jobs=1))


def test_wall_time_and_custom_index(tree):
    root, _ = tree
    frame = read_logs(root, NAMES, wall_time=True, index=["model", "tag", "step"])
    assert list(frame.index.names) == ["model", "tag", "step"]
    assert "wall_time" in frame.columns and frame["wall_time"].gt(1e9).all()
    with pytest.raises(ValueError, match="index columns"):
        read_logs(root, NAMES, index=["nope"])


def test_unnamed_and_mixed_depth(tree):
    root, _ = tree
    shallow = root / "glue" / "roberta" / "full"  # a run 3 levels deep among 6-level runs
    writer = SummaryWriter(str(shallow))
    writer.add_scalar("loss", 0.5, 0)
    writer.close()
    frame = read_logs(root, ["dataset", "model"]).reset_index()
    assert [c for c in frame.columns if c.startswith("segment_")] == [f"segment_{k}" for k in range(2, 6)]
    row = frame[frame["segment_2"] == "full"]
    assert len(row) == 1 and row["segment_3"].isna().all() and row["segment_5"].isna().all()
    named = read_logs(root, NAMES).reset_index()
    assert named[named["method"] == "full"]["seed"].isna().all()  # shallower runs: NA in missing levels


def test_corrupt_and_truncated_files_warn_and_keep_going(tree, tmp_path):
    root, runs = tree
    victim = next((root.joinpath(*runs[0])).glob("*tfevents*"))
    data = victim.read_bytes()
    victim.write_bytes(data[:-10])  # truncated mid-record
    garbage = root.joinpath(*runs[1]) / "events.out.tfevents.0.garbage"
    garbage.write_bytes(b"\x00\xff" * 100)
    assert check_event_file(victim) is not None and check_event_file(garbage) is not None
    with pytest.warns(EventFileWarning) as caught:
        frame = read_logs(root, NAMES)
    messages = " ".join(str(w.message) for w in caught)
    assert str(victim) in messages and str(garbage) in messages
    # the truncated run keeps what could be read; the other file of run 1 is intact
    assert 0 < len(frame.xs("roberta", level="model")) < len(runs) / 2 * len(TAGS) * STEPS
    with pytest.raises(ValueError, match=r"truncated|past the end"):
        read_logs(root, NAMES, strict=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EventFileWarning)
        summary = tb2parquet(root, tmp_path / "out.parquet", NAMES)
    assert len(summary.problems) == 2


def test_empty_and_missing_folders(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_logs(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no TensorBoard event files"):
        read_logs(tmp_path / "empty")
    assert cli(["tb2parquet", str(tmp_path / "empty"), str(tmp_path / "x.parquet")]) == 2
    assert "no TensorBoard event files" in capsys.readouterr().err
    assert not (tmp_path / "x.parquet").exists()


# --- names, tags and the output: refused before any work ------------------------------------


def test_tb2parquet_output_inside_the_log_folder_is_refused(tmp_path, capsys):
    (tmp_path / "logs").mkdir()
    assert run(["tb2parquet", str(tmp_path / "logs"), str(tmp_path / "logs" / "x.parquet")]) == 2
    assert "lies inside the input" in error_line(capsys.readouterr().err, "tb2parquet")
    with pytest.raises(ValueError, match="lies inside the input"):
        tb2parquet(tmp_path / "logs", tmp_path / "logs" / "x.parquet")


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


# --- issue 23: distinct runs stay distinct, one row per run, tag and step, and clear refusals -----------------


def write_run(folder, steps, offset=0.0, name=None):
    writer = SummaryWriter(str(folder), filename_suffix=name or "")
    for step in steps:
        writer.add_scalar("loss", float(step) + offset, step)
    writer.close()


@pytest.mark.parametrize(("column", "segments"), [("seed", ("07", "7")), ("lr", ("1e-4", "0.0001"))])
def test_segments_that_read_as_one_number_keep_their_runs_apart(column, segments, tmp_path):
    """Item 8: ``seed/07`` and ``seed/7`` (``lr/1e-4`` and ``lr/0.0001``) are two runs, not one."""
    for k, segment in enumerate(segments):
        write_run(tmp_path / "logs" / segment, range(3), offset=10.0 * k)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        frame = read_logs(tmp_path / "logs", [column]).reset_index()
    assert len(frame) == 6 and set(frame[column].astype(str)) == set(segments)
    assert not frame.duplicated([column, "tag", "step"]).any()
    for k, segment in enumerate(segments):
        assert sorted(frame[frame[column].astype(str) == segment]["value"]) == [10.0 * k, 10.0 * k + 1, 10.0 * k + 2]
    assert any(type(w.message).__name__ == "SegmentTypeWarning" and column in str(w.message) for w in caught)


def test_a_resumed_run_gives_one_row_per_step_the_last_written_wins(tmp_path):
    """Item 8: two event files of one run with the same steps (a resumed run) give one row per step."""
    import time

    write_run(tmp_path / "logs" / "run", range(5), offset=0.0, name=".first")
    time.sleep(1.1)  # the second file's name (its creation time) sorts after the first's
    write_run(tmp_path / "logs" / "run", range(3, 8), offset=100.0, name=".second")
    assert len(list((tmp_path / "logs" / "run").glob("*tfevents*"))) == 2
    frame = read_logs(tmp_path / "logs", ["name"]).reset_index()
    assert not frame.duplicated(["name", "tag", "step"]).any()
    values = dict(zip(frame["step"], frame["value"], strict=True))
    assert values == {0: 0.0, 1: 1.0, 2: 2.0, 3: 103.0, 4: 104.0, 5: 105.0, 6: 106.0, 7: 107.0}


def test_tags_that_match_nothing_are_refused_naming_the_tags_found(tmp_path, capsys):
    """Item 8: ``--tags nomatch`` is an error, not an empty file."""
    write_run(tmp_path / "logs" / "run", range(3))
    out = tmp_path / "x.parquet"
    assert run(["tb2parquet", str(tmp_path / "logs"), str(out), "--tags", "nomatch"]) == 2
    line = error_line(capsys.readouterr().err, "tb2parquet")
    assert "nomatch" in line and "loss" in line, line
    assert not out.exists()
    with pytest.raises(ValueError, match="nomatch"):
        read_logs(tmp_path / "logs", tags="nomatch")


@pytest.mark.parametrize("jobs", [0, -3, 1.5, True])
def test_jobs_must_be_a_positive_integer(jobs, tmp_path, capsys):
    """Item 11: ``jobs=0`` and ``jobs=-3`` are refused, in the API and on the command line."""
    write_run(tmp_path / "logs" / "run", range(2))
    with pytest.raises(ValueError, match="jobs must be a positive integer"):
        tb2parquet(tmp_path / "logs", tmp_path / "x.parquet", jobs=jobs)
    with pytest.raises(ValueError, match="jobs must be a positive integer"):
        read_logs(tmp_path / "logs", jobs=jobs)
    if isinstance(jobs, int) and not isinstance(jobs, bool):
        assert run(["tb2parquet", str(tmp_path / "logs"), str(tmp_path / "x.parquet"), "--jobs", str(jobs)]) == 2
        capsys.readouterr()
    assert not (tmp_path / "x.parquet").exists()


def test_a_file_given_as_the_log_folder_is_named_as_a_file(tmp_path, capsys):
    """Item 14: ``tb2parquet afile`` says it is a file, not that the folder does not exist."""
    (tmp_path / "afile").write_text("x")
    assert run(["tb2parquet", str(tmp_path / "afile"), str(tmp_path / "x.parquet")]) == 2
    line = error_line(capsys.readouterr().err, "tb2parquet")
    assert f"{tmp_path / 'afile'} is a file" in line and "does not exist" not in line


def test_a_tree_of_only_corrupt_event_files_names_one(tmp_path, capsys):
    """Item 14: "no scalars" names a file and why it could not be read."""
    (tmp_path / "logs" / "a").mkdir(parents=True)
    bad = tmp_path / "logs" / "a" / "events.out.tfevents.1.host"
    bad.write_bytes(b"garbage\x00\xff")
    assert run(["tb2parquet", str(tmp_path / "logs"), str(tmp_path / "x.parquet")]) == 2
    line = error_line(capsys.readouterr().err, "tb2parquet")
    assert str(bad) in line, line
    assert not (tmp_path / "x.parquet").exists()
