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
