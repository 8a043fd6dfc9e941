"""README.md's Measurements table, built from the runs in bench/results/*.json, so a quoted number cannot drift.

    python -m bench.report            # rewrite the table between the bench.report markers in README.md
    python -m bench.report --check    # exit 1, with a diff, when README.md's table is not the one the runs give

Each row (bench/report_rows.py) quotes the median over the runs at the newest clean commit that has a run of it
(same config, same machine), with the min-max and how many runs; fewer than three runs say so. Runs from a dirty
tree, an unknown commit or cut short stay in the JSON but are never quoted. A goal the median misses is
**missed**. Nothing here depends on the clock or on git: the same JSON always gives the same table.
"""

from __future__ import annotations

import argparse
import difflib
import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.report_rows import ROWS, Quote, Row
from bench.results_io import RESULTS, load_runs, quotable

README = Path(__file__).resolve().parent.parent / "README.md"
BEGIN, END = "<!-- bench.report:begin -->", "<!-- bench.report:end -->"
HEADER = ("| area | what was measured (command) | result: median (min-max), goal met or **missed** | goal | runs |\n"
          "|---|---|---|---|---|")
ENOUGH_RUNS = 3


@dataclass(frozen=True)
class Selection:
    """The runs a row quotes, and what else its JSON holds."""

    quoted: list[dict[str, Any]]  # clean runs at one commit, one config, one machine; empty when there are none
    recorded: list[dict[str, Any]]  # every run of the row's config filter, oldest first


def _machine_key(run: dict[str, Any]) -> str:
    return json.dumps(run.get("machine"), sort_keys=True)


def _matches(value: Any, wanted: Any) -> bool:
    """A config value equals ``wanted``, or is one of a tuple of accepted values."""
    return value in wanted if isinstance(wanted, tuple) else value == wanted


def select(row: Row, runs: list[dict[str, Any]]) -> Selection:
    """The runs at the newest clean commit (by run time) with the newest clean run's config and machine."""
    recorded = [r for r in runs if all(_matches(r.get("config", {}).get(k), v) for k, v in row.match.items())]
    clean = [r for r in recorded if quotable(r)]
    if not clean:
        return Selection([], recorded)
    newest = max(clean, key=lambda r: r["created_at"])
    same = [r for r in clean if r["commit"] == newest["commit"] and r["config_key"] == newest["config_key"]
            and _machine_key(r) == _machine_key(newest)]
    return Selection(same, recorded)


def _value(quote: Quote, run: dict[str, Any]) -> float | None:
    try:
        return float(quote.extract(run["results"]))
    except (KeyError, IndexError, TypeError, ValueError, StopIteration):
        return None  # a run from before this number was recorded


def quote_cell(quote: Quote, runs: list[dict[str, Any]]) -> str:
    """One quoted number over ``runs``: the median in bold, the min-max when there are several, and the goal's
    verdict on the median."""
    values = [v for v in (_value(quote, r) for r in runs) if v is not None]
    if not values:
        return f"{quote.label}: not in these runs"
    text = f"{quote.label} **{quote.fmt.format(statistics.median(values))}**"
    if len(values) > 1:
        text += f" ({quote.fmt.format(min(values))}-{quote.fmt.format(max(values))})"
    if len(values) < len(runs):
        text += f" ({len(values)} of the {len(runs)} runs)"
    if quote.goal:
        text += " met" if quote.goal.met(statistics.median(values)) else " **missed**"
    return text


def _marked(run: dict[str, Any]) -> str:
    if run.get("partial"):
        return "cut short"
    if run.get("commit") == "unknown":
        return "unknown commit"
    return "dirty tree" if run.get("dirty") else "clean"


def _at(run: dict[str, Any]) -> str:
    commit = "an unknown commit" if run["commit"] == "unknown" else f"`{run['commit'][:7]}`"
    gpu = (run.get("machine") or {}).get("gpu")
    return f"{commit} ({run['created_at'][:10]}{', ' + gpu if gpu else ''})"


def runs_cell(sel: Selection) -> str:
    """Which runs the numbers are from, and what the JSON holds besides (marked, never quoted)."""
    if not sel.recorded:
        return "no runs recorded"
    not_quotable = [r for r in sel.recorded if not quotable(r)]
    marks = ", ".join(sorted({_marked(r) for r in not_quotable}))
    others = f"{len(not_quotable)} not quotable ({marks})" if not_quotable else ""
    if not sel.quoted:
        newest, n = max(sel.recorded, key=lambda r: r["created_at"]), len(sel.recorded)
        return f"none quotable ({marks}): {n} run{'s' if n > 1 else ''}, the newest at {_at(newest)}"
    n = len(sel.quoted)
    parts = [f"{n} run{'s' if n > 1 else ''}{' (**<3 runs**)' if n < ENOUGH_RUNS else ''} at {_at(sel.quoted[0])}"]
    older = len(sel.recorded) - n - len(not_quotable)
    parts += [f"{older} clean at older commits or other configs"] if older else []
    parts += [others] if others else []
    return "; ".join(parts)


def render_row(row: Row, runs: list[dict[str, Any]]) -> str:
    sel = select(row, runs)
    goals = "; ".join((f"{q.label} " if len(row.quotes) > 1 else "") + q.goal.text
                      for q in row.quotes if q.goal) or "(measured)"
    if sel.quoted:
        result = "; ".join(quote_cell(q, sel.quoted) for q in row.quotes)
    else:
        result = "not quoted: " + ("no run at a clean commit" if sel.recorded else "never run")
    if row.note:
        result += f"; {row.note}"
    return f"| {row.area} | {row.measured} (`{row.command}`) | {result} | {goals} | {runs_cell(sel)} |"


def table(results_dir: Path = RESULTS) -> str:
    lines = [HEADER]
    for row in ROWS:
        lines.append(render_row(row, load_runs(results_dir / f"{row.source}.json")))
    return "\n".join(lines)


def splice(readme: str, body: str) -> str:
    """README text with ``body`` between the markers."""
    start, end = readme.find(BEGIN), readme.find(END)
    if start < 0 or end < start:
        raise SystemExit(f"README has no {BEGIN} ... {END} block for the Measurements table")
    return readme[: start + len(BEGIN)] + "\n" + body + "\n" + readme[end:]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="fail (exit 1, with a diff) when README's table is stale")
    ap.add_argument("--readme", type=Path, default=README, help="the README to build or check")
    ap.add_argument("--results", type=Path, default=RESULTS, help="the directory of results JSON")
    args = ap.parse_args(argv)
    current = args.readme.read_text()
    wanted = splice(current, table(args.results))
    if not args.check:
        if wanted != current:
            args.readme.write_text(wanted)
        print(f"{args.readme}: Measurements table {'rewritten' if wanted != current else 'already current'}")
        return 0
    if wanted == current:
        return 0
    diff = difflib.unified_diff(current.splitlines(), wanted.splitlines(), f"{args.readme} (as is)",
                                "from bench/results (python -m bench.report)", lineterm="")
    print("\n".join(diff), file=sys.stderr)
    print(f"{args.readme}: the Measurements table does not match bench/results; run python -m bench.report",
          file=sys.stderr)
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
