"""Move results files written before the runs format (one record, overwritten by each run) into it, recovering
the runs that earlier committed versions of each file held from git history.

    python -m bench.results_migrate            # every bench/results/*.json still in the old shape

Each recovered run keeps its record as it was, and says which commit added it (``committed_in``). A run that
several versions of a file carried (a later commit edited only its command line, say) is kept once, in its last
version, marked with the commit that first added it. Files already in the runs format are left alone.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any

from bench.results_io import BENCH, RESULTS, legacy_run, save_runs


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], capture_output=True, text=True, check=True, cwd=BENCH.parent).stdout


def committed_versions(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(commit, the file's JSON at that commit), oldest first, for every commit that changed the file."""
    rel = path.resolve().relative_to(BENCH.parent)
    versions = []
    for sha in _git("log", "--reverse", "--format=%H", "--", str(rel)).split():
        try:
            versions.append((sha, json.loads(_git("show", f"{sha}:{rel}"))))
        except (subprocess.CalledProcessError, json.JSONDecodeError):
            continue  # deleted or unreadable at that commit
    return versions


def _identity(record: dict[str, Any]) -> tuple[str, str]:
    """The same run in two versions of a file: same time, same numbers."""
    numbers = json.dumps(record.get("results"), sort_keys=True, default=str)
    return record.get("created_at", ""), hashlib.sha256(numbers.encode()).hexdigest()


def migrate(path: Path) -> list[dict[str, Any]] | None:
    """The runs for ``path`` (None when it is already in the runs format)."""
    current = json.loads(path.read_text())
    if "runs" in current:
        return None
    first_seen: dict[tuple[str, str], str] = {}
    last_version: dict[tuple[str, str], dict[str, Any]] = {}
    for sha, record in committed_versions(path):
        if "runs" in record:
            continue
        first_seen.setdefault(_identity(record), sha)
        last_version[_identity(record)] = record
    last_version[_identity(current)] = current  # the working tree's version, committed or not
    runs = [legacy_run(record, first_seen.get(key)) for key, record in last_version.items()]
    return sorted(runs, key=lambda run: run["created_at"])


def main() -> int:
    for path in sorted(RESULTS.glob("*.json")):
        runs = migrate(path)
        if runs is None:
            print(f"{path.name}: already in the runs format")
            continue
        save_runs(path, path.stem, runs)
        print(f"{path.name}: {len(runs)} run(s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
