"""The shutdown flush: DRAM-only blocks go to SSD within capacity and a time limit, and a restart finds them."""

from __future__ import annotations

import threading
import time

from crescent.services.kvstore.blocks import BlockKey, EventKind, Tier
from crescent.services.kvstore.flush import flush_in_background, flush_to_ssd
from crescent.services.kvstore.store import BlockStore

BLOCK = 4096  # a multiple of 4 KiB, so restarted reads take the O_DIRECT path as in production


def key(h: int) -> BlockKey:
    return BlockKey("m", h, 0, 2)


def data(h: int) -> bytes:
    return bytes((h * 13 + i) % 251 for i in range(BLOCK))


def make(tmp_path, dram_blocks: int, ssd_blocks: int, events=None) -> BlockStore:
    return BlockStore(dram_blocks * BLOCK, ssd_blocks * BLOCK, tmp_path / "ssd", block_bytes=BLOCK,
                      fsync=False, event_sink=None if events is None else events.append)


def test_flush_writes_dram_only_blocks_and_a_restart_serves_them(tmp_path):
    events: list = []
    store = make(tmp_path, dram_blocks=4, ssd_blocks=8, events=events)
    for h in (1, 2, 3, 4, 5):
        store.put(key(h), data(h), meta=bytes([h]))  # 5 demotes 1 to SSD
    assert store.tier_of(key(1)) == Tier.SSD
    store.get(key(1))  # promoted: in DRAM with its SSD copy kept
    copy_of_1 = store.ssd.path(key(1)).stat()
    report = flush_to_ssd(store, timeout_s=10)
    assert (report.written, report.already_on_ssd, report.no_room, report.failed, report.left) == (3, 1, 0, 0, 0)
    assert report.complete
    assert store.ssd.path(key(1)).stat().st_mtime_ns == copy_of_1.st_mtime_ns  # not rewritten
    stored_ssd = [e.block_hashes[0] for e in events if e.kind == EventKind.STORED and e.tier == Tier.SSD]
    assert stored_ssd == [5, 4, 3]  # most recently used first (2 was demoted by the promotion of 1)
    assert store.get(key(4)) == (data(4), bytes([4]))  # the running store still serves from DRAM
    del store
    again = make(tmp_path, dram_blocks=4, ssd_blocks=8)
    assert [again.tier_of(key(h)) for h in (1, 2, 3, 4, 5)] == [Tier.SSD] * 5
    for h in (1, 2, 3, 4, 5):
        assert again.get(key(h)) == (data(h), bytes([h]))  # promoted with a verified checksum


def test_flush_is_bounded_by_ssd_capacity_and_keeps_the_most_recent(tmp_path):
    store = make(tmp_path, dram_blocks=4, ssd_blocks=2)
    for h in (1, 2, 3, 4):
        store.put(key(h), data(h))
    store.get(key(1))  # LRU order now 2, 3, 4, 1
    report = flush_to_ssd(store, timeout_s=10)
    assert (report.written, report.no_room, report.left) == (2, 2, 0)
    assert report.complete  # no room is by design (the SSD tier is full of newer blocks), not a failure
    del store
    again = make(tmp_path, dram_blocks=4, ssd_blocks=2)
    assert [again.tier_of(key(h)) for h in (1, 2, 3, 4)] == [Tier.SSD, Tier.NONE, Tier.NONE, Tier.SSD]
    # the restart's LRU order is the use order: a new demotion-sized claim drops 4 (older) before 1
    assert again.claim_ssd_room(BLOCK) and again.tier_of(key(4)) == Tier.NONE
    assert again.tier_of(key(1)) == Tier.SSD


def test_flush_drops_older_ssd_only_blocks_for_dram_ones(tmp_path):
    store = make(tmp_path, dram_blocks=2, ssd_blocks=2)
    for h in (1, 2, 3, 4):
        store.put(key(h), data(h))  # 1 and 2 demoted: SSD is full
    report = flush_to_ssd(store, timeout_s=10)
    assert report.written == 2 and report.no_room == 0
    assert [store.tier_of(key(h)) for h in (1, 2)] == [Tier.NONE, Tier.NONE]


def test_corrupt_dram_block_is_not_flushed(tmp_path):
    store = make(tmp_path, dram_blocks=2, ssd_blocks=4)
    store.put(key(1), data(1))
    store.put(key(2), data(2))
    lease = store.acquire(key(1))
    lease.view[0] ^= 0xFF
    store.release(lease)
    report = flush_to_ssd(store, timeout_s=10)
    assert (report.written, report.failed) == (1, 1) and not report.complete
    assert not store.ssd.path(key(1)).exists() and store.ssd.path(key(2)).exists()


def test_time_limit_leaves_the_rest_and_counts_it(tmp_path):
    store = make(tmp_path, dram_blocks=6, ssd_blocks=8)
    for h in range(6):
        store.put(key(h), data(h))
    write = store.ssd.write

    def slow_write(record, view):
        time.sleep(0.15)
        write(record, view)

    store.ssd.write = slow_write
    report = flush_to_ssd(store, timeout_s=0.2)
    assert 1 <= report.written < 6 and report.left == 6 - report.written and not report.complete
    assert store.put(key(99), data(99))  # every flush pin was given back: slots can be reused


def test_a_hung_disk_never_hangs_shutdown(tmp_path):
    store = make(tmp_path, dram_blocks=2, ssd_blocks=4)
    store.put(key(1), data(1))
    unblock = threading.Event()
    store.ssd.write = lambda record, view: unblock.wait(10)
    started = time.monotonic()
    report = flush_in_background(store, timeout_s=0.2, grace_s=0.2)
    assert time.monotonic() - started < 2 and not report.finished and not report.complete
    unblock.set()
