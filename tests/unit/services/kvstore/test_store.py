"""BlockStore: tiers, LRU order, leases, checksums, restart and a full disk, on tiny blocks."""

from __future__ import annotations

import os

import pytest
from prometheus_client import REGISTRY

from crescent.services.kvstore.blocks import BlockKey, EventKind, Tier, checksum
from crescent.services.kvstore.store import BlockStore, StoreFullError

BLOCK = 256


def key(h: int, model: str = "m") -> BlockKey:
    return BlockKey(model, h, 0, 4)


def data(h: int) -> bytes:
    return bytes((h * 7 + i) % 251 for i in range(BLOCK))


def metric(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.fixture
def events():
    return []


def make(tmp_path, events, dram_blocks=3, ssd_blocks=2, **kw) -> BlockStore:
    return BlockStore(dram_blocks * BLOCK, ssd_blocks * BLOCK, tmp_path / "ssd", block_bytes=BLOCK,
                      event_sink=events.append, fsync=False, **kw)


def test_put_get_roundtrip_with_metadata(tmp_path, events):
    store = make(tmp_path, events)
    assert store.put(key(1), data(1), meta=b"centroids")
    assert not store.put(key(1), data(1))  # content-addressed: a second put is a no-op
    assert store.get(key(1)) == (data(1), b"centroids")
    assert store.get(key(2)) is None
    assert store.get(BlockKey("m", 1, 0, 2)) is None  # another layer range is another block
    assert [e.kind for e in events] == [EventKind.STORED]


def test_demotion_promotion_and_eviction_order(tmp_path, events):
    store = make(tmp_path, events)
    for h in (1, 2, 3):
        store.put(key(h), data(h))
    store.get(key(1))                      # 1 is now most recent: LRU order 2, 3, 1
    store.put(key(4), data(4))             # demotes 2
    assert store.tier_of(key(2)) == Tier.SSD
    store.put(key(5), data(5))             # demotes 3
    assert [store.tier_of(key(h)) for h in (1, 2, 3, 4, 5)] == [
        Tier.DRAM,
        Tier.SSD,
        Tier.SSD,
        Tier.DRAM,
        Tier.DRAM,
    ]
    store.put(key(6), data(6))  # demotes 1; SSD full, so its LRU block (2) is evicted
    assert store.tier_of(key(2)) == Tier.NONE and store.tier_of(key(1)) == Tier.SSD
    evicted = [e for e in events if e.kind == EventKind.EVICTED]
    assert [(e.block_hashes, e.tier) for e in evicted] == [([2], Tier.SSD)]
    promotions = metric("crescent_kvstore_promotions_total")
    assert store.get(key(3)) == (data(3), b"")  # an SSD hit is copied up (DRAM's LRU block, 4, is demoted)
    assert store.tier_of(key(3)) == Tier.DRAM and store.tier_of(key(4)) == Tier.SSD
    assert metric("crescent_kvstore_promotions_total") == promotions + 1
    # making SSD room for 4 evicted SSD's LRU unpinned block (1; 3 was pinned by its own promotion)
    assert store.tier_of(key(1)) == Tier.NONE and store.ssd.path(key(3)).exists()
    moved = [(e.block_hashes[0], e.from_tier, e.tier) for e in events if e.kind == EventKind.MOVED]
    assert moved == [(h, Tier.DRAM, Tier.SSD) for h in (2, 3, 1, 4)]
    assert (events[-1].kind, events[-1].tier, events[-1].block_hashes) == (EventKind.STORED, Tier.DRAM, [3])
    st = store.stats()
    assert (st["blocks_dram"], st["blocks_ssd"], st["ssd_bytes_used"]) == (3, 2, 2 * BLOCK)
    store.get(key(5))
    store.get(key(6))  # 3 is DRAM's LRU again
    store.put(key(7), data(7))  # demoting 3 writes nothing: its SSD copy is still there
    assert store.tier_of(key(3)) == Tier.SSD and len([e for e in events if e.kind == EventKind.MOVED]) == 4
    assert (events[-2].kind, events[-2].tier, events[-2].block_hashes) == (EventKind.EVICTED, Tier.DRAM, [3])


def test_lookup_by_exact_or_any_layer_range(tmp_path, events):
    store = make(tmp_path, events, dram_blocks=2, ssd_blocks=1)
    store.put(BlockKey("m", 1, 0, 2), data(1))
    store.put(BlockKey("m", 1, 2, 4), data(2))   # the same block's other layers
    store.put(BlockKey("m", 2, 0, 4), data(3))   # demotes (1, [0, 2)) to SSD
    assert store.lookup("m", [1, 2, 3], (0, 2)) == (1, [Tier.SSD, Tier.NONE, Tier.NONE])
    assert store.lookup("m", [1, 2, 3]) == (2, [Tier.DRAM, Tier.DRAM, Tier.NONE])  # fastest tier of any range
    store.put(BlockKey("m", 3, 0, 4), data(4))   # demotes (1, [2, 4)); SSD holds one block: [0, 2) is evicted
    assert store.lookup("m", [1]) == (1, [Tier.SSD])
    store.put(BlockKey("m", 4, 0, 4), data(5))   # demotes block 2, evicting (1, [2, 4)): block 1 is gone
    assert store.lookup("m", [1, 2]) == (0, [Tier.NONE, Tier.SSD])


def test_no_ssd_tier_drops_lru(tmp_path, events):
    store = BlockStore(2 * BLOCK, block_bytes=BLOCK, event_sink=events.append)
    for h in (1, 2, 3):
        store.put(key(h), data(h))
    assert store.get(key(1)) is None and store.get(key(3)) == (data(3), b"")
    assert events[-2].kind == EventKind.EVICTED and events[-2].block_hashes == [1]


def test_corrupt_dram_block_is_a_miss(tmp_path, events):
    store = make(tmp_path, events)
    store.put(key(1), data(1))
    before = metric("crescent_kvstore_corrupt_blocks_total", tier="dram")
    store.arena.buffer[5] ^= 0xFF  # slot 0 holds the first block
    assert store.get(key(1)) is None
    assert metric("crescent_kvstore_corrupt_blocks_total", tier="dram") == before + 1
    assert store.tier_of(key(1)) == Tier.NONE
    store.put(key(1), data(1))  # the slot was freed and the block can be stored again
    assert store.get(key(1)) == (data(1), b"")


def test_corrupt_ssd_block_is_a_miss(tmp_path, events):
    store = make(tmp_path, events, dram_blocks=1)
    store.put(key(1), data(1), meta=b"x")
    store.put(key(2), data(2))  # demotes 1
    path = store.ssd.path(key(1))
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0x01
    path.write_bytes(raw)
    before = metric("crescent_kvstore_corrupt_blocks_total", tier="ssd")
    assert store.get(key(1)) is None
    assert metric("crescent_kvstore_corrupt_blocks_total", tier="ssd") == before + 1
    assert not path.exists() and store.get(key(2)) == (data(2), b"")


def test_restart_finds_ssd_blocks_and_ignores_partial_files(tmp_path, events):
    store = make(tmp_path, events, dram_blocks=1, ssd_blocks=4)
    for h in (1, 2, 3):
        store.put(key(h), data(h), meta=bytes([h]))
    # a crash mid-write leaves a temp file; a torn file is shorter than its header says
    tmp_file = store.ssd.path(key(9)).with_suffix(".tmp")
    tmp_file.parent.mkdir(exist_ok=True)
    tmp_file.write_bytes(b"half a block")
    torn = store.ssd.path(key(8))
    torn.parent.mkdir(exist_ok=True)
    torn.write_bytes(store.ssd.path(key(1)).read_bytes()[:100])
    del store
    again = BlockStore(BLOCK, 4 * BLOCK, tmp_path / "ssd", fsync=False)  # block_bytes learned from disk
    assert again.block_bytes == BLOCK
    assert [again.tier_of(key(h)) for h in (1, 2, 3)] == [Tier.SSD, Tier.SSD, Tier.NONE]
    assert again.get(key(2)) == (data(2), bytes([2])) and again.get(key(1)) == (data(1), bytes([1]))
    assert not tmp_file.exists()
    assert again.stats()["blocks_ssd"] == 2  # promotion copies up; the SSD copies stay


def test_pinned_block_is_not_evicted(tmp_path, events):
    store = make(tmp_path, events, dram_blocks=2, ssd_blocks=0)
    store.put(key(1), data(1))
    store.put(key(2), data(2))
    lease = store.acquire(key(1))  # 1 is LRU but pinned
    store.get(key(2))
    store.put(key(3), data(3))  # must evict 2, not 1
    assert store.tier_of(key(1)) == Tier.DRAM and store.tier_of(key(2)) == Tier.NONE
    other = store.acquire(key(3))
    with pytest.raises(StoreFullError):
        store.put(key(4), data(4))
    assert bytes(lease.view) == data(1)
    store.release(lease)
    store.release(other)
    assert store.put(key(4), data(4))


def test_bad_input(tmp_path, events):
    store = make(tmp_path, events)
    with pytest.raises(ValueError, match="does not fit"):
        store.put(key(1), b"x" * (BLOCK + 1))
    with pytest.raises(ValueError, match="does not fit"):
        store.put(key(1), b"")
    with pytest.raises(ValueError, match="layer range"):
        store.put(BlockKey("m", 1, 3, 3), data(1))
    with pytest.raises(ValueError, match="uint64"):
        store.put(BlockKey("m", -1, 0, 1), data(1))
    assert store.put(key(1), b"y" * 100)  # a smaller block (e.g. one layer's slice) fits a slot
    assert store.get(key(1)) == (b"y" * 100, b"")


def test_full_disk_drops_the_demoted_block_and_keeps_serving(tmp_path, events):
    store = make(tmp_path, events, dram_blocks=1, ssd_blocks=4)
    store.put(key(1), data(1))
    tmp_file = store.ssd.path(key(1)).with_suffix(".tmp")
    tmp_file.parent.mkdir(exist_ok=True)
    os.symlink("/dev/full", tmp_file)  # writes to the temp file fail with a real ENOSPC
    store.put(key(2), data(2))  # demoting 1 fails: 1 is dropped, 2 is stored
    assert store.tier_of(key(1)) == Tier.NONE and store.get(key(2)) == (data(2), b"")
    assert events[-1].kind == EventKind.STORED and events[-2].kind == EventKind.EVICTED
    assert not tmp_file.exists() and not store.ssd.path(key(1)).exists()
    store.put(key(3), data(3))  # the disk "has room" again: demotion of 2 works
    assert store.tier_of(key(2)) == Tier.SSD


def test_auto_block_size_from_first_put(tmp_path, events):
    store = BlockStore(4 * BLOCK)
    assert store.arena is None
    store.put(key(1), data(1))
    assert store.block_bytes == BLOCK and store.arena.num_slots == 4


def test_occupancy_gauges_are_read_at_scrape_time(tmp_path, events):
    store = make(tmp_path, events, dram_blocks=2, ssd_blocks=4)
    for h in (1, 2, 3):
        store.put(key(h), data(h))
    assert metric("crescent_kvstore_blocks", tier="dram") == 2
    assert metric("crescent_kvstore_blocks", tier="ssd") == 1
    assert metric("crescent_kvstore_bytes_used", tier="ssd") == BLOCK
    assert metric("crescent_kvstore_capacity_bytes", tier="dram") == 2 * BLOCK


def test_acquire_many_reads_ssd_blocks_in_parallel_and_pins_them(tmp_path, events):
    store = make(tmp_path, events, dram_blocks=4, ssd_blocks=8)
    for h in range(1, 8):
        store.put(key(h), data(h))  # 1..3 end up on SSD only
    leases = store.acquire_many([key(h) for h in (1, 9, 2, 3, 7)])
    assert leases[1] is None
    assert [bytes(le.view) for le in leases if le] == [data(h) for h in (1, 2, 3, 7)]
    assert all(le.record.pins == 1 for le in leases if le)
    for le in leases:
        if le:
            store.release(le)
    assert metric("crescent_kvstore_promotions_total") >= 3


def test_keep_free_demotes_lru_up_to_a_quarter_of_the_arena(tmp_path, events):
    store = make(tmp_path, events, dram_blocks=8, ssd_blocks=8)
    for h in range(8):
        store.put(key(h), data(h))
    store.get(key(0))  # 0 becomes most recent: LRU order 1..7, 0
    lease = store.acquire(key(1))  # pinned: skipped
    assert store.keep_free(5) == 2  # capped at 8 // 4 slots
    assert store.arena.free_slots == 2
    assert [store.tier_of(key(h)) for h in (0, 1, 2, 3, 4)] == [Tier.DRAM, Tier.DRAM, Tier.SSD, Tier.SSD,
                                                                 Tier.DRAM]
    store.release(lease)
    assert store.get(key(2)) == (data(2), b"")  # demoted, still served


def test_reserve_slots_refuses_a_bad_size_before_taking_any_slot(tmp_path, events):
    store = make(tmp_path, events, dram_blocks=4, ssd_blocks=0)
    assert store.reserve_slots([], []).tolist() == []
    with pytest.raises(ValueError, match="block sizes"):
        store.reserve_slots([key(1), key(2)], [BLOCK, BLOCK + 1])
    assert store.arena.free_slots == 4  # nothing leaked
    slots = store.reserve_slots([key(1), key(2)], [BLOCK, 10]).tolist()
    crcs = []
    for slot, h, size in zip(slots, (1, 2), (BLOCK, 10), strict=True):
        store.arena.view(slot, size)[:] = data(h)[:size]
        crcs.append(checksum(data(h)[:size]))
    store.commit_slots([key(1), key(2)], slots, [BLOCK, 10], crcs)
    assert store.get(key(1)) == (data(1), b"") and store.get(key(2)) == (data(2)[:10], b"")
    assert [e.kind for e in events] == [EventKind.STORED, EventKind.STORED]
