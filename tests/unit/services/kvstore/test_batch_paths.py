"""The 64 KiB-block batch paths: slot-only reservation in ascending order, publishing filled slots, batch
eviction, array-built receive groups and GET descriptions, and batch key validation."""

from __future__ import annotations

import numpy as np
import pytest

from crescent.services.kvstore import small_puts
from crescent.services.kvstore.blocks import BlockKey, Tier, checksum, crc_update
from crescent.services.kvstore.crc_pipeline import verify_all
from crescent.services.kvstore.data_server import _describe, _describe_with_meta
from crescent.services.kvstore.store import SLOT_EXISTS, SLOT_FULL, BlockStore
from crescent.services.kvstore.tcp import split_payload

BLOCK = 256


def key(h: int, layers: tuple[int, int] = (0, 4)) -> BlockKey:
    return BlockKey("m", h, *layers)


def data(h: int) -> bytes:
    return bytes((h * 7 + i) % 251 for i in range(BLOCK))


def fill(store: BlockStore, slot: int, payload: bytes) -> int:
    store.arena.view(slot, len(payload))[:] = payload
    return crc_update(payload)


def put_batch(store: BlockStore, hashes: list[int]) -> np.ndarray:
    slots = store.reserve_slots([key(h) for h in hashes], [BLOCK] * len(hashes))
    filled = [(key(h), int(s), fill(store, int(s), data(h))) for h, s in zip(hashes, slots, strict=True) if s >= 0]
    store.commit_slots([k for k, _, _ in filled], [s for _, s, _ in filled], [BLOCK] * len(filled),
                       [c for _, _, c in filled])
    return slots


def test_reserve_slots_hands_out_ascending_slots_after_evictions():
    store = BlockStore(8 * BLOCK, block_bytes=BLOCK)
    put_batch(store, list(range(8)))
    slots = put_batch(store, list(range(100, 106))).tolist()  # evicts the 6 least recently used
    assert slots == sorted(slots) and slots == list(range(slots[0], slots[0] + 6))
    assert [store.tier_of(key(h)) for h in range(8)] == [Tier.NONE] * 6 + [Tier.DRAM] * 2
    assert all(store.get(key(h)) == (data(h), b"") for h in range(100, 106))


def test_reserve_slots_marks_stored_blocks_and_what_did_not_fit():
    store = BlockStore(4 * BLOCK, block_bytes=BLOCK)
    put_batch(store, [1])
    lease = store.acquire(key(1))  # pinned: cannot be evicted
    slots = store.reserve_slots([key(h) for h in (1, 2, 3, 4, 5)], [BLOCK] * 5)
    assert slots[0] == SLOT_EXISTS and slots[4] == SLOT_FULL  # 4 slots: one pinned block, three reserved
    assert slots[1:4].tolist() == sorted(slots[1:4].tolist()) and (slots[1:4] >= 0).all()
    assert store.lookup("m", [2, 3, 4]) == (0, [Tier.NONE] * 3)  # reserved slots are invisible
    store.release_slots(slots[1:4])
    store.release(lease)
    assert store.arena.free_slots == 3


def test_commit_slots_keeps_the_copy_another_put_published_first():
    store = BlockStore(4 * BLOCK, block_bytes=BLOCK)
    first = store.reserve_slots([key(1)], [BLOCK])
    second = store.reserve_slots([key(1)], [BLOCK])  # the same block, a concurrent put: its own slot
    assert first[0] >= 0 and second[0] >= 0 and first[0] != second[0]
    store.commit_slots([key(1)], [int(first[0])], [BLOCK], [fill(store, int(first[0]), data(1))])
    store.commit_slots([key(1)], [int(second[0])], [BLOCK], [fill(store, int(second[0]), data(2))])
    assert store.get(key(1)) == (data(1), b"") and store.arena.free_slots == 3  # the loser's slot is back


@pytest.mark.parametrize("bad", [BlockKey("m", 1 << 64, 0, 4), BlockKey("m", -1, 0, 4), BlockKey("m", 1, 4, 4),
                                 BlockKey("x" * 600, 1, 0, 4)], ids=["hash-too-big", "hash-negative",
                                                                     "empty-layers", "long-model"])
def test_reserve_slots_refuses_a_bad_key_anywhere_in_the_batch(bad):
    store = BlockStore(4 * BLOCK, block_bytes=BLOCK)
    with pytest.raises(ValueError):
        store.reserve_slots([key(1), bad, key(2)], [BLOCK] * 3)
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
    slots = np.array([4, 5, SLOT_EXISTS, 6, 7, SLOT_FULL, 8, 9], np.int64)
    sizes = [BLOCK] * 7 + [10]
    assert small_puts._groups(slots, sizes, BLOCK) == [(0, 2), (2, 3), (3, 5), (5, 6), (6, 8)]
    # a short block ends its group: the next block's bytes do not follow it in the arena
    short = [BLOCK, 10, BLOCK, BLOCK]
    assert small_puts._groups(np.arange(20, 24), short, BLOCK) == [(0, 2), (2, 4)]
    # slots out of order break runs; a long run is cut into groups of GROUP_BYTES
    assert small_puts._groups(np.array([3, 2, 10, 11, 12, 13, 14]), [BLOCK] * 7, BLOCK) == [
        (0, 1), (1, 2), (2, 5), (5, 7)]
    assert small_puts._groups(np.array([], np.int64), [], BLOCK) == []


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
