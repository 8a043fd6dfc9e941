"""bench/report.py: README's Measurements table quotes only clean runs, and --check catches a hand edit."""

from __future__ import annotations

import re
import shutil

from bench import report
from bench.report import BEGIN, END, main, render_row
from bench.report_rows import Quote, Row, at, ge

OLD, NEW = "1" * 40, "2" * 40
ROW = Row("demo", "a ratio", "python -m bench.demo", "demo", (Quote("ratio", at("ratio"), goal=ge(1.5, ">= 1.5x")),))


def run(ratio, commit=NEW, dirty=False, at_time="2026-11-23T10:00:00Z", config=None):
    return {"commit": commit, "dirty": dirty, "partial": False, "created_at": at_time, "config": config or {},
            "config_key": "k", "machine": {"cpu_count": 2}, "results": {"ratio": ratio}}


def test_dirty_and_unknown_commit_runs_are_never_quoted():
    runs = [run(1.2, OLD, at_time="2026-11-23T08:00:00Z"),
            run(9.99, NEW, dirty=True, at_time="2026-11-23T09:00:00Z"),
            run(8.88, "unknown", dirty=None, at_time="2026-11-23T09:30:00Z")]
    line = render_row(ROW, runs)
    assert "**1.20x** **missed**" in line and "9.99" not in line and "8.88" not in line
    assert f"1 run (**<3 runs**) at `{OLD[:7]}`" in line
    assert "2 not quotable (dirty tree, unknown commit)" in line


def test_only_dirty_runs_quote_nothing():
    line = render_row(ROW, [run(9.99, NEW, dirty=True)])
    assert "not quoted: no run at a clean commit" in line and "9.99" not in line
    assert "none quotable (dirty tree): 1 run, the newest at `2222222`" in line


def test_the_median_over_the_newest_clean_commits_runs_with_its_min_max():
    runs = [run(5.0, OLD, at_time="2026-11-23T08:00:00Z")]
    runs += [run(r, NEW, at_time=f"2026-11-23T1{i}:00:00Z") for i, r in enumerate((1.6, 2.0, 1.8))]
    line = render_row(ROW, runs)
    assert "ratio **1.80x** (1.60x-2.00x) met" in line and "5.00" not in line
    assert f"3 runs at `{NEW[:7]}`" in line and "<3 runs" not in line
    assert "1 clean at older commits or other configs" in line


def test_a_rows_config_filter_keeps_other_configs_out():
    row = Row(**{**ROW.__dict__, "match": {"threads": 2}})
    line = render_row(row, [run(1.6, config={"threads": 2}), run(7.0, config={"threads": 1})])
    assert "**1.60x**" in line and "7.00" not in line


def test_check_passes_on_the_repository():
    assert main(["--check"]) == 0


def test_check_fails_when_a_number_is_edited_by_hand(tmp_path, capsys):
    readme = tmp_path / "README.md"
    shutil.copy(report.README, readme)
    text = readme.read_text()
    block_at = text.index(BEGIN)
    number = re.compile(r"\*\*(\d+)\.(\d+)").search(text, block_at, text.index(END))
    assert number, "the generated table quotes no number"
    edited = f"**{int(number.group(1)) + 1}.{number.group(2)}"
    readme.write_text(text[: number.start()] + edited + text[number.end():])

    assert main(["--check", "--readme", str(readme)]) == 1
    diff = capsys.readouterr().err.splitlines()
    assert any(line.startswith("-|") and edited in line for line in diff)  # the hand edit, taken out
    assert any(line.startswith("+|") and number.group(0) in line for line in diff)  # the JSON's number
    assert "run python -m bench.report" in diff[-1]

    assert main(["--readme", str(readme)]) == 0  # regenerating puts the number back
    assert readme.read_text() == text
    assert main(["--check", "--readme", str(readme)]) == 0
