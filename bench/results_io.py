"""One way to record a benchmark result: JSON with the exact command, commit, config and machine, beside a PNG."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def git_commit() -> str:
    """HEAD's commit, with "+dirty" when the tree has uncommitted changes; "unknown" outside git. Results written
    by an earlier benchmark (bench/results/) do not count: a second run after a first is still of a clean tree."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=RESULTS.parent).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ":/",
                                ":(exclude,top)bench/results"], capture_output=True, text=True,
                               cwd=RESULTS.parent).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def command_line() -> str:
    """How this process was started, as a person would retype it (``python -m pkg.mod args`` for modules)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name:
        name = spec.name.removesuffix(".__main__")
        return " ".join(["python", "-m", name, *sys.argv[1:]])
    return " ".join(["python", *sys.argv])


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "processor": platform.processor()}
    try:
        import os

        import torch

        info["torch"] = torch.__version__
        info["cpu_count"] = os.cpu_count()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def write_result(name: str, config: dict[str, Any], results: dict[str, Any], figure=None) -> Path:
    """Write bench/results/<name>.json (and <name>.png from a matplotlib figure); returns the JSON path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    record = {
        "name": name,
        "command": command_line(),
        "commit": git_commit(),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        "config": config,
        "results": results,
    }
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    if figure is not None:
        figure.savefig(RESULTS / f"{name}.png", dpi=110, bbox_inches="tight")
    return path
