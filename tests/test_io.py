"""Atomic outputs: complete or absent, and a failed write keeps what was there."""

import pytest

from stages.core import io


def test_atomic_dir_replaces_only_on_success(tmp_path):
    out = tmp_path / "model"
    with io.atomic_dir(out) as d:
        (d / "weights").write_text("v1")
    assert (out / "weights").read_text() == "v1"
    with pytest.raises(RuntimeError):
        with io.atomic_dir(out) as d:
            (d / "weights").write_text("half")
            raise RuntimeError("killed mid-write")
    assert (out / "weights").read_text() == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temp left behind


def test_atomic_file_keeps_old_content_on_failure(tmp_path):
    f = tmp_path / "m.json"
    io.write_json(f, {"a": 1})
    with pytest.raises(ValueError):
        with io.atomic_file(f) as fh:
            fh.write("{partial")
            raise ValueError
    assert io.read_json(f) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json"]


def test_jsonl_round_trip_and_bad_row(tmp_path):
    f = tmp_path / "rows.jsonl"
    assert io.write_jsonl(f, [{"x": 1}, {"x": 2}]) == 2
    assert io.read_jsonl(f) == [{"x": 1}, {"x": 2}]
    f.write_text('{"x": 1}\n{"x": \n')
    with pytest.raises(ValueError, match="row 2"):
        io.read_jsonl(f)


def test_csv_union_of_keys(tmp_path):
    f = tmp_path / "p.csv"
    io.write_csv(f, [{"step": 1, "loss": 0.5}, {"step": 2, "probe": 0.25, "loss": None}])
    assert f.read_text().splitlines() == ["step,loss,probe", "1,0.5,", "2,,0.25"]


def test_a_killed_writers_temporaries_are_swept_by_the_next_write(tmp_path):
    """A writer killed inside atomic_dir leaves .tmp-<name>-<pid>-… beside the target; the next write of
    that target removes it, and leaves alone the temporaries of a writer that is still alive."""
    import os
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    (tmp_path / f".tmp-reports-{dead_pid}-abc").mkdir()
    (tmp_path / f".tmp-reports-{dead_pid}-abc" / "comparison.md").write_text("half")
    (tmp_path / f".old-reports-{dead_pid}").mkdir()
    live = tmp_path / f".tmp-reports-{os.getppid()}-xyz"
    live.mkdir()
    other = tmp_path / f".tmp-metrics-{dead_pid}-abc"
    other.mkdir()
    with io.atomic_dir(tmp_path / "reports") as d:
        (d / "comparison.md").write_text("whole")
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted(["reports", live.name, other.name])  # another target's leftovers wait for its writer
    assert (tmp_path / "reports" / "comparison.md").read_text() == "whole"
