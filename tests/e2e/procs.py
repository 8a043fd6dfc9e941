"""What the e2e tests read of `crescent up`'s processes from /proc: its service children and their flags."""

from __future__ import annotations

from pathlib import Path


def service_children(parent_pid: int) -> dict[str, int]:
    """role -> pid of `crescent up`'s service processes (its direct children, `crescent.cli serve ROLE`)."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (stat.parent / "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):  # the process ended while we read it
            continue
        if ppid == parent_pid and b"serve" in cmdline:
            found[cmdline[cmdline.index(b"serve") + 1].decode()] = int(stat.parent.name)
    return found


def flag_value(pid: int, name: str) -> str:
    """The value after ``name`` on a process's command line."""
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    return argv[argv.index(name) + 1]


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, their children, ...), e.g. vLLM's engine core under a worker."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError):  # the process ended while we read it
            continue
    found, frontier = [], [pid]
    while frontier:
        below = [p for p, parent in parents.items() if parent in frontier]
        found += below
        frontier = below
    return found


def alive(pid: int) -> bool:
    """Whether ``pid`` still runs (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
