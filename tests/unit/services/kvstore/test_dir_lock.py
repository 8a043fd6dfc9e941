"""One kvstore per data directory: the second holder is refused with the first one's pid; release frees it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from crescent.services.kvstore.dir_lock import DataDirInUse, DataDirLock


def test_a_second_lock_on_the_same_directory_is_refused_until_the_first_is_released(tmp_path):
    first = DataDirLock(tmp_path / "ssd").acquire()
    with pytest.raises(DataDirInUse, match=rf"in use by another kvstore \(pid {os.getpid()}\)"):
        DataDirLock(tmp_path / "ssd").acquire()
    assert DataDirLock(tmp_path / "other").acquire().fd is not None  # another directory is free
    first.release()
    second = DataDirLock(tmp_path / "ssd").acquire()
    second.release()
    second.release()  # idempotent


def test_the_lock_goes_with_its_process(tmp_path):
    """A holder that dies (here: exits without releasing) leaves no stale lock behind."""
    code = ("import sys; from crescent.services.kvstore.dir_lock import DataDirLock; "
            f"DataDirLock({str(tmp_path)!r}).acquire(); sys.exit(0)")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    DataDirLock(tmp_path).acquire().release()
