"""The 64 KiB-block batch paths: ascending slot reservation, batch eviction, array-built receive groups and GET
descriptions, the checksum queue two threads drain, and batch key validation."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from crescent.services.kvstore import small_puts
from crescent.services.kvstore.blocks import BlockKey, StoreFullError, Tier, checksum, crc_update
from crescent.services.kvstore.crc_pipeline import BlockCrcs, CrcBatch, verify_all
from crescent.services.kvstore.data_server import _describe, _describe_with_meta
from crescent.services.kvstore.store import BlockStore
from crescent.services.kvstore.tcp import split_payload

BLOCK = 256


def key(h: int, layers: tuple[int, int] = (0, 4)) -> BlockKey:
    return BlockKey("m", h, *layers)


def data(h: int) -> bytes:
    return bytes((h * 7 + i) % 251 for i in range(BLOCK))


def put_batch(store: BlockStore, hashes: list[int]) -> list:
    got = store.reserve_many([key(h) for h in hashes], [BLOCK] * len(hashes))
    for res, h in zip(got, hashes, strict=True):
        if res is not None and not isinstance(res, StoreFullError):
            res.view[:] = data(h)
            res.record.crc = checksum(res.view)
    store.commit_checksummed([r for r in got if r is not None and not isinstance(r, StoreFullError)])
    return got


def test_reserve_many_hands_out_ascending_slots_after_evictions():
    store = BlockStore(8 * BLOCK, block_bytes=BLOCK)
    put_batch(store, list(range(8)))
    got = put_batch(store, list(range(100, 106)))  # evicts the 6 least recently used, frees their slots
    slots = [r.record.slot for r in got]
    assert slots == sorted(slots) and slots == list(range(slots[0], slots[0] + 6))
    assert [store.tier_of(key(h)) for h in range(8)] == [Tier.NONE] * 6 + [Tier.DRAM] * 2
    assert all(store.get(key(h)) == (data(h), b"") for h in range(100, 106))


def test_reserve_many_marks_stored_blocks_and_what_did_not_fit():
    store = BlockStore(4 * BLOCK, block_bytes=BLOCK)
    put_batch(store, [1])
    lease = store.acquire(key(1))  # pinned: cannot be evicted
    got = store.reserve_many([key(h) for h in (1, 2, 3, 4, 5)], [BLOCK] * 5)
    assert got[0] is None  # already stored
    assert [r.record.slot for r in got[1:4]] == sorted(r.record.slot for r in got[1:4])
    assert isinstance(got[4], StoreFullError)  # 4 slots: one pinned block, three reservations
    for res in got[1:4]:
        store.abort(res)
    store.release(lease)
    assert store.arena.free_slots == 3


@pytest.mark.parametrize("bad", [BlockKey("m", 1 << 64, 0, 4), BlockKey("m", -1, 0, 4), BlockKey("m", 1, 4, 4),
                                 BlockKey("x" * 600, 1, 0, 4)], ids=["hash-too-big", "hash-negative",
                                                                     "empty-layers", "long-model"])
def test_reserve_many_refuses_a_bad_key_anywhere_in_the_batch(bad):
    store = BlockStore(4 * BLOCK, block_bytes=BLOCK)
    with pytest.raises(ValueError):
        store.reserve_many([key(1), bad, key(2)], [BLOCK] * 3)
    assert store.arena.free_slots == 4


def test_keep_free_drops_lru_blocks_of_a_dram_only_store_and_unindexes_them():
    store = BlockStore(8 * BLOCK, block_bytes=BLOCK)
    put_batch(store, list(range(8)))
    store.get(key(0))  # LRU order 1..7, 0
    lease = store.acquire(key(1))  # pinned: skipped
    assert store.keep_free(2) == 2
    assert [store.tier_of(key(h)) for h in (0, 1, 2, 3, 4)] == [Tier.DRAM, Tier.DRAM, Tier.NONE, Tier.NONE,
                                                                 Tier.DRAM]
    assert store.lookup("m", [2], None) == (0, [Tier.NONE])  # gone from the any-layer index too
    assert store.lookup("m", [4], None) == (1, [Tier.DRAM])
    store.release(lease)


def test_groups_join_consecutive_full_slots_up_to_the_group_size(monkeypatch):
    monkeypatch.setattr(small_puts, "GROUP_BYTES", 3 * BLOCK)
    store = BlockStore(16 * BLOCK, block_bytes=BLOCK)
    got = store.reserve_many([key(h) for h in range(8)], [BLOCK] * 7 + [10])
    got[2] = None          # stored already: alone, breaks the run
    got[5] = StoreFullError("full")
    sizes = [BLOCK] * 7 + [10]
    assert small_puts._groups(got, sizes, BLOCK) == [(0, 2), (2, 3), (3, 5), (5, 6), (6, 8)]
    # a short block ends its group: the next block's bytes do not follow it in the arena
    short = [BLOCK, 10, BLOCK, BLOCK]
    got = store.reserve_many([key(h) for h in range(20, 24)], short)
    assert small_puts._groups(got, short, BLOCK) == [(0, 2), (2, 4)]


def test_block_crcs_are_drained_by_two_threads_without_losing_a_group():
    store = BlockStore(64 * BLOCK, block_bytes=BLOCK)
    got = store.reserve_many([key(h) for h in range(64)], [BLOCK] * 64)
    for res, h in zip(got, range(64), strict=True):
        res.view[:] = data(h)
    with ThreadPoolExecutor(1) as helper:
        batch = CrcBatch(helper)
        for at in range(0, 64, 8):
            batch.add_blocks(got[at : at + 8], 8 * BLOCK)
        batch.commit(store)  # the socket thread drains what the helper has not taken, then waits for it
    assert all(store.get(key(h)) == (data(h), b"") for h in range(64))
    assert all(r.record.crc == crc_update(data(h)) for r, h in zip(got, range(64), strict=True))


def test_block_crcs_finish_waits_for_a_group_in_progress():
    crcs = BlockCrcs()
    started, release = threading.Event(), threading.Event()

    class SlowView:  # a reservation whose checksum blocks until released
        class record:
            crc = 0

        @property
        def view(self):
            started.set()
            release.wait(5)
            return b"abc"

    crcs.items.append([SlowView()])
    worker = threading.Thread(target=crcs.drain)
    worker.start()
    assert started.wait(5)
    done = threading.Event()
    waiter = threading.Thread(target=lambda: (crcs.finish(), done.set()))
    waiter.start()
    assert not done.wait(0.1)  # the other thread's group is not finished yet
    release.set()
    assert done.wait(5)
    worker.join(5)
    waiter.join(5)
    assert SlowView.record.crc == crc_update(b"abc")


def test_describe_matches_the_per_block_description():
    store = BlockStore(16 * BLOCK, block_bytes=BLOCK)
    put_batch(store, list(range(6)))
    put_batch(store, [50, 51])
    store.put(key(52), data(52)[:100])  # a short block: its run ends with it
    keys = [key(h) for h in (0, 1, 99, 2, 50, 51, 52, 3, 5)]  # a miss inside a run, runs out of order
    leases = store.acquire_many(keys)
    fast = _describe(leases, store.arena)
    slow = _describe_with_meta([lease.record if lease else None for lease in leases], store.arena)
    for a, b in zip(fast[:4], slow[:4], strict=True):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    assert b"".join(bytes(x) for x in fast[4]) == b"".join(bytes(x) for x in slow[4])
    assert len(fast[4]) == len(slow[4])
    store.release_many(leases)


def test_verify_all_drops_a_corrupt_block_and_keeps_the_rest():
    store = BlockStore(4 * BLOCK, block_bytes=BLOCK)
    put_batch(store, [1, 2])
    store.put(key(3), data(3), meta=b"centroids")
    leases = store.acquire_many([key(1), key(9), key(2), key(3)], verify=False)
    leases[2].view[0] ^= 0xFF  # bit rot in DRAM
    assert verify_all(store, leases) == [True, False, False, True]
    store.release_many(leases)
    assert store.tier_of(key(2)) == Tier.NONE and store.get(key(1)) == (data(1), b"")


def test_split_payload_cuts_hits_with_metadata_around_misses_and_drops_bad_checksums():
    blocks = {0: (b"m0", data(0)), 2: (b"", data(2)[:50]), 3: (b"meta3", data(3))}
    count = 5  # blocks 1 and 4 are misses
    statuses = np.array([1 if i in blocks else 0 for i in range(count)], np.uint8)
    sizes = np.array([len(blocks[i][1]) if i in blocks else 0 for i in range(count)], np.uint64)
    crcs = np.array([checksum(blocks[i][1], blocks[i][0]) if i in blocks else 0 for i in range(count)], np.uint32)
    crcs[3] ^= 1  # block 3 arrives with a checksum that does not match its bytes
    metas = np.array([len(blocks[i][0]) if i in blocks else 0 for i in range(count)], np.uint32)
    reply = bytearray(statuses.tobytes() + sizes.tobytes() + crcs.tobytes() + metas.tobytes())
    payload = memoryview(bytearray(b"".join(blocks[i][0] + blocks[i][1] for i in sorted(blocks))))
    got = split_payload(reply, count, payload, verify=False)
    assert [None if g is None else (g.meta, bytes(g.data)) for g in got] == [
        blocks[0], None, blocks[2], blocks[3], None]
    checked = split_payload(reply, count, payload, verify=True)
    assert [g is not None for g in checked] == [True, False, True, False, False]
