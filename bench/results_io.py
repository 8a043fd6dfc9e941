"""One way to record benchmark results: every run appended to bench/results/<name>.json, beside a PNG.

A results file is ``{"name", "format": 2, "runs": [run, ...]}``, oldest run first. A run records how it was made
(command, config and its ``config_key``, commit, dirty flag, UTC time, load average, machine) and its numbers
(``results``). Runs are only ever added, never overwritten, so a number quoted in README.md can always be traced
to the runs it came from (``python -m bench.report``); runs of different configs stay apart by ``config_key``.
A run from a dirty tree or an unknown commit is kept but is not quotable (``quotable``).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
FORMAT = 2
UNKNOWN = "unknown"
_SHA = re.compile(r"^[0-9a-f]{40}$")
# Measured alongside a run, not chosen for it: left out of config_key so that two runs of one config match.
VOLATILE_CONFIG_KEYS = frozenset({"loadavg_before", "loadavg_after", "load_average", "load_average_before",
                                  "load_average_after"})


def git_state() -> tuple[str, bool | None]:
    """HEAD's commit and whether the tree has uncommitted changes; ("unknown", None) outside git. Results written
    by an earlier benchmark (bench/results/) do not count: a second run after a first is still of a clean tree."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=BENCH).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ":/",
                                ":(exclude,top)bench/results"], capture_output=True, text=True, check=True,
                               cwd=BENCH).stdout.strip()
        return head, bool(dirty)
    except (OSError, subprocess.CalledProcessError):
        return UNKNOWN, None


def parse_commit(text: str | None) -> tuple[str, bool | None]:
    """A commit as people and older results write it ("<sha>", "<sha>+dirty", "unknown", "uncommitted") as
    (commit, dirty): the GPU machine's copy of the tree has no .git, so its operator passes --commit."""
    sha, _, suffix = (text or "").strip().partition("+")
    if not _SHA.match(sha):
        return UNKNOWN, None
    return sha, suffix == "dirty"


def quotable(run: dict[str, Any]) -> bool:
    """Whether README may quote this run: a finished run of a known commit's clean tree."""
    return bool(_SHA.match(run.get("commit", ""))) and run.get("dirty") is False and not run.get("partial")


def config_key(config: dict[str, Any]) -> str:
    """A short, stable name for a config: the same settings give the same key in every run."""
    stable = {k: v for k, v in config.items() if k not in VOLATILE_CONFIG_KEYS}
    canonical = json.dumps(stable, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


def command_line() -> str:
    """How this process was started, as a person would retype it (``python -m pkg.mod args`` for modules)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name:
        name = spec.name.removesuffix(".__main__")
        return " ".join(["python", "-m", name, *sys.argv[1:]])
    return " ".join(["python", *sys.argv])


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "processor": platform.processor(), "cpu_count": os.cpu_count()}
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def new_run_id() -> str:
    """A name for one run, for a benchmark that saves the same run several times as it goes."""
    return uuid.uuid4().hex[:12]


def new_run(config: dict[str, Any], results: dict[str, Any], commit: str | None = None,
            run_id: str | None = None, partial: bool = False) -> dict[str, Any]:
    """This process's run record; ``commit`` overrides git (see ``parse_commit``)."""
    sha, dirty = parse_commit(commit) if commit else git_state()
    return {
        "run_id": run_id or new_run_id(),
        "command": command_line(),
        "commit": sha,
        "dirty": dirty,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "load_average": list(os.getloadavg()),
        "machine": machine(),
        "config_key": config_key(config),
        "config": config,
        "partial": partial,
        "results": results,
    }


def load_runs(path: Path) -> list[dict[str, Any]]:
    """The runs in a results file, oldest first; a file from before the runs format is one run."""
    if not path.exists():
        return []
    doc = json.loads(path.read_text())
    return doc["runs"] if "runs" in doc else [legacy_run(doc)]


def legacy_run(record: dict[str, Any], committed_in: str | None = None) -> dict[str, Any]:
    """A run from a results file written before the runs format (one record, overwritten by each run).
    ``committed_in``: the commit that added this version of the file, when it came from git history."""
    config, results = record.get("config") or {}, record.get("results") or {}
    sha, dirty = parse_commit(record.get("commit"))
    load = next((src[k] for src in (results, config) for k in ("load_average", "load_average_before",
                                                               "loadavg_before", "loadavg_after") if k in src),
                None)
    run = {"run_id": f"legacy-{record.get('created_at', '')}", "command": record.get("command", ""),
           "commit": sha, "dirty": dirty, "commit_as_written": record.get("commit"),
           "created_at": record.get("created_at", ""), "load_average": load, "machine": record.get("machine"),
           "config_key": config_key(config), "config": config, "partial": False, "results": results}
    if committed_in:
        run["committed_in"] = committed_in
    return run


def save_runs(path: Path, name: str, runs: list[dict[str, Any]]) -> None:
    doc = {"name": name, "format": FORMAT, "runs": runs}
    tmp = path.with_suffix(".json.tmp")  # a reader never sees half a file
    tmp.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    tmp.replace(path)


def write_result(name: str, config: dict[str, Any], results: dict[str, Any], figure=None,
                 commit: str | None = None, run_id: str | None = None, partial: bool = False) -> Path:
    """Append this run to bench/results/<name>.json (and draw <name>.png from a matplotlib figure); returns the
    JSON path. A benchmark that saves as it goes passes one ``run_id`` and ``partial=True`` until its last save:
    that run's record is updated in place, and a partial run is never quoted. Earlier runs are never touched."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    run = new_run(config, results, commit, run_id, partial)
    runs = [r for r in load_runs(path) if run_id is None or r.get("run_id") != run_id]
    save_runs(path, name, [*runs, run])
    if figure is not None:
        figure.savefig(RESULTS / f"{name}.png", dpi=110, bbox_inches="tight")
    return path
