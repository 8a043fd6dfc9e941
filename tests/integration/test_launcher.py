"""ServiceGroup: health waits, a dead child is noticed and restarted, stop escalates SIGTERM -> SIGKILL within the
grace, and nothing a child started outlives it."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest

from crescent.services.common.launcher import ServiceGroup, free_port, http_ok

SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]
STUBBORN = [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "print('ready', flush=True); time.sleep(60)"]


def test_wait_healthy_fails_fast_when_a_child_exits(tmp_path):
    group = ServiceGroup(tmp_path)
    group.start("ok", SLEEPER, health=lambda: False)
    group.start("crashes", [sys.executable, "-c", "raise SystemExit(3)"], health=lambda: False)
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="crashes"):
        group.wait_healthy(timeout_s=20)
    assert time.monotonic() - started < 10
    group.stop(grace_s=5)
    assert all(c.proc.poll() is not None for c in group.children)


def test_wait_healthy_times_out(tmp_path):
    group = ServiceGroup(tmp_path)
    group.start("never-healthy", SLEEPER, health=http_ok(f"http://127.0.0.1:{free_port()}/health", 0.2))
    with pytest.raises(TimeoutError, match="never-healthy"):
        group.wait_healthy(timeout_s=1.0)
    group.stop(grace_s=5)


def test_stop_kills_a_child_that_ignores_sigterm(tmp_path):
    group = ServiceGroup(tmp_path)
    child = group.start("stubborn", STUBBORN)
    deadline = time.monotonic() + 20
    while "ready" not in (tmp_path / "stubborn.log").read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    started = time.monotonic()
    group.stop(grace_s=1.0)
    assert child.proc.returncode == -9 and time.monotonic() - started < 8


def test_kill_one_leaves_the_others(tmp_path):
    group = ServiceGroup(tmp_path)
    group.start("a", SLEEPER)
    group.start("b", SLEEPER)
    group.kill("a")
    assert group.dead() == ["a (exit -9)"]
    group.stop(grace_s=5)
    assert group.children[1].proc.returncode == -15


def test_supervise_restarts_a_dead_child_with_backoff_and_leaves_the_others(tmp_path):
    group = ServiceGroup(tmp_path)
    group.start("a", SLEEPER)
    other = group.start("b", SLEEPER)
    group.kill("a")
    t0 = time.monotonic()
    said = group.supervise(t0)
    assert said == ["a exited (-9); restarting in 1s"]
    assert group.supervise(t0 + 0.5) == []  # still backing off
    said = group.supervise(t0 + 1.0)
    assert len(said) == 1 and said[0].startswith("a restarted (pid ")
    assert group.children[0].proc.poll() is None and other.proc.poll() is None and group.dead() == []
    group.kill("a")  # dies again at once: the next wait doubles
    assert group.supervise(t0 + 1.5) == ["a exited (-9); restarting in 2s"]
    assert (tmp_path / "a.log").read_text().count("restart 1") == 1
    group.stop(grace_s=5)


def test_supervise_ends_what_a_dead_child_left_running(tmp_path):
    """A child's own children (vLLM's engine core under a worker) do not outlive it: they hold cores and memory, and
    the restarted child would start a second set beside them."""
    parent = [sys.executable, "-c", "import subprocess, sys, time; "
              "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
              "print(p.pid, flush=True); time.sleep(60)"]
    group = ServiceGroup(tmp_path)
    child = group.start("a", parent)
    deadline = time.monotonic() + 20
    while not (tmp_path / "a.log").read_text().strip() and time.monotonic() < deadline:
        time.sleep(0.05)
    grandchild = int((tmp_path / "a.log").read_text().split()[0])
    os.kill(child.proc.pid, signal.SIGKILL)  # the child alone, as a crash would
    child.proc.wait(timeout=10)
    assert _running(grandchild)
    group.supervise()
    deadline = time.monotonic() + 10
    while _running(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _running(grandchild)
    group.stop(grace_s=5)


def test_stop_ends_what_a_stopped_child_left_running(tmp_path):
    """A child that exits on SIGTERM but leaves a process of its group that ignores it (vLLM's model worker after
    its engine core is gone) leaves nothing running after stop()."""
    parent = [sys.executable, "-c", "import subprocess, sys, time; "
              "subprocess.Popen([sys.executable, '-c', 'import os, signal, time; "
              "signal.signal(signal.SIGTERM, signal.SIG_IGN); print(os.getpid(), flush=True); time.sleep(60)']); "
              "time.sleep(60)"]
    group = ServiceGroup(tmp_path)
    group.start("a", parent)
    deadline = time.monotonic() + 20
    while not (tmp_path / "a.log").read_text().strip() and time.monotonic() < deadline:
        time.sleep(0.05)
    grandchild = int((tmp_path / "a.log").read_text().split()[0])
    group.stop(grace_s=5)
    assert group.children[0].proc.returncode == -15
    deadline = time.monotonic() + 10
    while _running(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _running(grandchild)


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan is reaped by init, on its own schedule)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
