"""One kvstore per data directory: an exclusive lock on ``<data_dir>/LOCK`` for as long as the service runs.

Two stores on one directory would index, evict and delete each other's block files (and a restart would adopt
the other's blocks as its own). The second one to start is refused with a message naming the holder. The lock is
an ``flock``, so it goes with the process however that ends: a crash leaves no stale lock to clean up.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

LOCK_NAME = "LOCK"


class DataDirInUse(RuntimeError):
    """Another kvstore holds this data directory."""


class DataDirLock:
    def __init__(self, data_dir: str | Path):
        self.root = Path(data_dir)
        self.fd: int | None = None

    def acquire(self) -> DataDirLock:
        """Take the lock (creating the directory); DataDirInUse when another kvstore holds it."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise DataDirInUse(f"kvstore data_dir {self.root} is in use by another kvstore (pid {holder}); give "
                               "each kvstore its own data_dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
