"""Shutdown flush: write the DRAM tier's blocks that have no SSD copy down to the SSD tier, so a restart finds
them (the SSD index is rebuilt from disk; a hit verifies the checksum as every read does).

Bounded three ways: by the SSD tier's capacity (the most recently used blocks go first, and room is made only
by dropping SSD-only blocks, which are all older than anything in DRAM), by a time limit checked between
blocks, and, in :func:`flush_in_background`, by a join with a timeout, so a disk that hangs in a write cannot
hang the shutdown. Blocks that already have an SSD copy (promoted ones) are not rewritten. The files get
modification times in recency order, so the restarted store's LRU order is the order the blocks were used in.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from crescent.services.kvstore.blocks import checksum
from crescent.services.kvstore.store import BlockStore

log = logging.getLogger(__name__)


@dataclass
class FlushReport:
    written: int = 0         # blocks written to SSD by this flush
    already_on_ssd: int = 0  # DRAM blocks that had an SSD copy: not rewritten
    no_room: int = 0         # did not fit in the SSD tier's capacity
    failed: int = 0          # a write error or a block that failed its checksum (never persisted)
    left: int = 0            # not reached before the time limit
    seconds: float = 0.0
    finished: bool = False   # the flush ran to its end (False: still writing when the caller gave up)

    @property
    def complete(self) -> bool:
        """Every DRAM block that fits the SSD tier is on it."""
        return self.finished and self.failed == 0 and self.left == 0

    def summary(self) -> str:
        return (f"{self.written} written, {self.already_on_ssd} already on SSD, {self.no_room} without room, "
                f"{self.failed} failed, {self.left} left unwritten, in {self.seconds:.2f}s")


def flush_to_ssd(store: BlockStore, timeout_s: float, report: FlushReport | None = None) -> FlushReport:
    """Write every DRAM-only block to SSD, most recently used first, until done or ``timeout_s`` passes.

    ``report`` is filled as the flush goes (a caller that stops waiting still sees the counts so far)."""
    report = report or FlushReport()
    started = time.monotonic()
    deadline = started + timeout_s
    pinned, report.already_on_ssd = store.pin_dram_only()
    newest_ns = time.time_ns() + len(pinned) * 1000
    try:
        for rank, record in enumerate(pinned):
            if store.ssd.capacity_bytes <= 0 or time.monotonic() > deadline:
                break
            if not store.claim_ssd_room(record.size):
                report.no_room += 1
                continue
            if _write_copy(store, record, newest_ns - rank * 1000):
                report.written += 1
            else:
                store.return_ssd_room(record.size)
                report.failed += 1
    finally:
        done = report.written + report.no_room + report.failed
        report.left = len(pinned) - done
        for record in pinned:
            store.unpin(record)
        report.seconds = time.monotonic() - started
        report.finished = True
    return report


def _write_copy(store: BlockStore, record, mtime_ns: int) -> bool:
    view = store.arena.view(record.slot, record.size)
    if checksum(view, record.meta) != record.crc:
        log.error("block %s failed its checksum in DRAM; not flushed", record.key)
        return False
    try:
        store.ssd.write(record, view)  # atomic: a failure leaves no file behind
    except OSError as exc:
        log.error("flushing block %s to SSD failed: %s", record.key, exc)
        return False
    try:
        store.ssd.set_recency(record.key, mtime_ns)  # 1 us apart, MRU newest: the restart's LRU order
    except OSError as exc:
        log.warning("could not stamp the recency of %s: %s", record.key, exc)
    store.add_ssd_copy(record)
    return True


def flush_in_background(store: BlockStore, timeout_s: float, grace_s: float = 2.0) -> FlushReport:
    """Run :func:`flush_to_ssd` on a daemon thread and wait at most ``timeout_s + grace_s`` for it; log the
    counts either way. A write stuck in the kernel is left behind (the process exits without it)."""
    report = FlushReport()
    thread = threading.Thread(target=flush_to_ssd, args=(store, timeout_s, report), name="kvstore-flush",
                              daemon=True)
    thread.start()
    thread.join(timeout_s + grace_s)
    if not report.finished:
        log.warning("shutdown flush did not finish within %.1fs; giving up with %d written so far",
                    timeout_s + grace_s, report.written)
    elif report.complete:
        log.info("shutdown flush: %s", report.summary())
    else:
        log.warning("shutdown flush incomplete: %s", report.summary())
    return report
