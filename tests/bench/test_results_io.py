"""bench/results_io.py: every run is appended and kept; dirty or unknown-commit runs are marked."""

from __future__ import annotations

import json

import pytest

from bench import results_io
from bench.results_io import RESULTS, config_key, load_runs, parse_commit, quotable, write_result

SHA = "a" * 40


@pytest.fixture
def results_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(results_io, "RESULTS", tmp_path)
    return tmp_path


def test_appending_keeps_earlier_runs(results_dir):
    write_result("demo", {"size": 1}, {"speedup": 1.5}, commit=SHA)
    write_result("demo", {"size": 1}, {"speedup": 1.7}, commit=SHA)
    path = write_result("demo", {"size": 2}, {"speedup": 9.0}, commit=SHA + "+dirty")
    runs = load_runs(path)
    assert [r["results"]["speedup"] for r in runs] == [1.5, 1.7, 9.0]
    assert runs[0]["config_key"] == runs[1]["config_key"] != runs[2]["config_key"]
    assert [r["dirty"] for r in runs] == [False, False, True]
    for field in ("command", "config", "commit", "created_at", "load_average", "machine"):
        assert runs[0][field] is not None, field
    assert json.loads(path.read_text())["format"] == results_io.FORMAT


def test_a_file_from_before_the_runs_format_becomes_the_first_run(results_dir):
    old = {"name": "demo", "command": "python -m bench.demo", "commit": SHA + "+dirty",
           "created_at": "2026-11-23T07:00:00Z", "machine": {}, "config": {"size": 1, "loadavg_before": [3.0]},
           "results": {"speedup": 1.2}}
    (results_dir / "demo.json").write_text(json.dumps(old))
    runs = load_runs(write_result("demo", {"size": 1}, {"speedup": 1.4}, commit=SHA))
    assert [r["results"]["speedup"] for r in runs] == [1.2, 1.4]
    assert runs[0]["dirty"] is True and runs[0]["commit_as_written"] == SHA + "+dirty"
    assert runs[0]["load_average"] == [3.0]
    assert runs[0]["config_key"] == runs[1]["config_key"]  # a measured load is not part of the config


def test_a_run_saved_as_it_goes_is_one_run_and_partial_until_its_last_save(results_dir):
    write_result("demo", {"size": 1}, {"rows": [0]}, commit=SHA)
    write_result("demo", {"size": 1}, {"rows": [1]}, commit=SHA, run_id="r1", partial=True)
    runs = load_runs(write_result("demo", {"size": 1}, {"rows": [1, 2]}, commit=SHA, run_id="r1", partial=True))
    assert [r["results"]["rows"] for r in runs] == [[0], [1, 2]]
    assert not quotable(runs[1])
    runs = load_runs(write_result("demo", {"size": 1}, {"rows": [1, 2, 3]}, commit=SHA, run_id="r1"))
    assert [r["results"]["rows"] for r in runs] == [[0], [1, 2, 3]] and quotable(runs[1])


@pytest.mark.parametrize(("written", "commit", "dirty"), [
    (SHA, SHA, False), (SHA + "+dirty", SHA, True), ("unknown", "unknown", None),
    ("uncommitted", "unknown", None), ("", "unknown", None), ("abc123", "unknown", None),
])
def test_commits_as_written_by_hand_or_by_older_results(written, commit, dirty):
    assert parse_commit(written) == (commit, dirty)


def test_only_finished_runs_of_a_clean_known_commit_are_quotable():
    run = {"commit": SHA, "dirty": False, "partial": False}
    assert quotable(run)
    assert not quotable({**run, "dirty": True})
    assert not quotable({**run, "dirty": None})
    assert not quotable({**run, "commit": "unknown"})
    assert not quotable({**run, "partial": True})


def test_config_key_ignores_order_and_measured_load():
    assert config_key({"a": 1, "b": [2]}) == config_key({"b": [2], "a": 1, "loadavg_after": [9.0]})
    assert config_key({"a": 1}) != config_key({"a": 2})


def test_every_committed_results_file_is_in_the_runs_format():
    for path in sorted(RESULTS.glob("*.json")):
        doc = json.loads(path.read_text())
        assert doc.get("format") == results_io.FORMAT and doc["runs"], path.name
        for run in doc["runs"]:
            missing = {"command", "config", "config_key", "commit", "dirty", "created_at", "results"} - set(run)
            assert not missing, (path.name, missing)
