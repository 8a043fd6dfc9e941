"""The block store: a DRAM arena over an SSD tier, LRU, checksummed, with leases and KV events.

Locking: one lock guards the index (records, LRU order, free slots, pins). Bytes move outside it: a reader
pins a record (a lease) and copies or sends from the slot without the lock; a writer reserves a slot, fills it
without the lock and commits (:meth:`reserve`/:meth:`commit` for one block; :meth:`reserve_slots`/
:meth:`commit_slots` for a batch of small blocks, with nothing made per block until it is published). A reserved
slot is off the free list and in no index, so nothing is freed or moved under a writer; eviction skips pinned
records, so nothing is freed or moved under a reader. Demotion to SSD writes under the lock (simple and safe; it
runs only when the DRAM tier is full).

Eviction, demotion and the shutdown flush's steps live in :mod:`tiering`. Promotion copies a block up and keeps
its SSD file, so a later demotion of an unchanged block writes nothing
and every block that ever reached SSD survives a restart. Events are per tier: STORED(tier) when a block lands
in a tier, EVICTED(tier) when it leaves one, MOVED(SSD from DRAM) when demotion writes it down.
"""

from __future__ import annotations

import dataclasses
import logging
import operator
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from crescent.services.common import metrics
from crescent.services.kvstore.blocks import (
    MAX_META_BYTES,
    BlockKey,
    BlockRecord,
    EventKind,
    KvEvent,
    Lease,
    Reservation,
    StoreFullError,
    Tier,
    checksum,
)
from crescent.services.kvstore.dram import DramArena
from crescent.services.kvstore.ssd import SsdTier
from crescent.services.kvstore.tiering import TierMoves

log = logging.getLogger(__name__)
SLOT_EXISTS, SLOT_FULL = -1, -2  # reserve_slots: the block is stored already / no slot could be had
_SSD_READERS = ThreadPoolExecutor(max_workers=4, thread_name_prefix="kvstore-ssd")  # reads release the GIL


def _validate_all(keys: list[BlockKey]) -> None:
    """:meth:`BlockKey.validate` for a batch, once per distinct (model, layer range) (a batch is one of those),
    with the hashes range-checked in C: a per-key Python check shows in 64 KiB-block profiles."""
    for model_id, layer_start, layer_end in set(map(_MODEL_AND_LAYERS, keys)):
        BlockKey(model_id, 0, layer_start, layer_end).validate()
    hashes = list(map(_HASH, keys))
    if not 0 <= min(hashes) <= max(hashes) < 1 << 64:
        next(key for key in keys if not 0 <= key.block_hash < 1 << 64).validate()


_MODEL_AND_LAYERS = operator.itemgetter(0, 2, 3)
_HASH = operator.itemgetter(1)


class BlockStore(TierMoves):
    def __init__(
        self,
        dram_capacity_bytes: int,
        ssd_capacity_bytes: int = 0,
        data_dir: str | Path = "",
        block_bytes: int = 0,
        event_sink: Callable[[KvEvent], None] | None = None,
        fsync: bool = True,
        prefault: bool = False,
    ):
        if ssd_capacity_bytes > 0 and not data_dir:
            raise ValueError("an SSD tier (ssd_capacity_bytes > 0) needs a data_dir")
        self.dram_capacity_bytes = dram_capacity_bytes
        self.prefault = prefault
        self.block_bytes = block_bytes
        self.event_sink = event_sink
        self.ssd = SsdTier(data_dir or ".", ssd_capacity_bytes, fsync=fsync)
        self.arena: DramArena | None = None
        self.arena_listeners: list[Callable[[DramArena], None]] = []
        self._lock = threading.Lock()
        self._dram: OrderedDict[BlockKey, BlockRecord] = OrderedDict()  # first = least recently used
        self._ssd: OrderedDict[BlockKey, BlockRecord] = OrderedDict()
        self._ssd_used = 0
        self._dram_evictions = 0  # not yet added to the metric
        # (model_id, block_hash) -> stored layer ranges, for lookups that do not name a range
        self._ranges: dict[tuple[str, int], set[tuple[int, int]]] = {}
        for record in self.ssd.scan():
            self.block_bytes = self.block_bytes or record.size
            if record.size > self.block_bytes:
                log.warning(
                    "SSD block %s is larger than block_bytes %d; ignored", record.key, self.block_bytes
                )
                continue
            self._ssd[record.key] = record
            self._ssd_used += record.size
            self._index_add(record.key)
        if self.block_bytes:
            self._create_arena(self.block_bytes)
        metrics.STORE_BYTES_CAPACITY.labels("ssd").set(ssd_capacity_bytes)
        self._export_gauges()

    # --- writes --------------------------------------------------------------------------------------------
    def reserve(self, key: BlockKey, size: int, meta: bytes = b"") -> Reservation | None:
        """A slot to fill with ``size`` bytes; None when the block is already stored (content-addressed)."""
        key.validate()
        if len(meta) > MAX_META_BYTES:
            raise ValueError(f"block metadata of {len(meta)} bytes exceeds {MAX_META_BYTES}")
        with self._lock:
            try:
                return self._reserve_locked(key, size, bytes(meta))
            finally:
                self._count_evictions()

    def reserve_slots(self, keys: list[BlockKey], sizes: list[int]) -> np.ndarray:
        """Reserve DRAM slots for a run of blocks without metadata, under one hold of the lock: each block's
        slot, ``SLOT_EXISTS`` when it is stored already, ``SLOT_FULL`` when no slot could be had (every other
        one pinned). Nothing is made per block: a reserved slot is only off the free list, invisible to
        readers, until :meth:`commit_slots` publishes it or :meth:`release_slots` gives it back.

        The slots ascend, so blocks of one batch land in consecutive slots: the data server receives a whole
        run with one ``recv_into`` and sends it back with one iovec (freed slots come back in LRU order, which
        a free-list stack would otherwise hand out backwards)."""
        if len(keys) != len(sizes):
            raise ValueError(f"{len(keys)} keys but {len(sizes)} sizes")
        out = np.full(len(keys), SLOT_EXISTS, np.int64)
        if not keys:
            return out
        _validate_all(keys)
        with self._lock:
            if not self.block_bytes:
                self._create_arena(sizes[0])
            if not 0 < min(sizes) <= max(sizes) <= self.block_bytes:  # checked before any slot is taken
                raise ValueError(f"block sizes must be in (0, {self.block_bytes}] bytes for this store's slots")
            dram, ssd = self._dram, self._ssd
            new = np.array([i for i, key in enumerate(keys) if key not in dram and key not in ssd], np.int64)
            slots = self._take_slots(len(new))
            slots.sort()
            out[new[: len(slots)]] = slots
            out[new[len(slots) :]] = SLOT_FULL
            self._count_evictions()
        return out

    def commit_slots(self, keys: list[BlockKey], slots: list[int], sizes: list[int], crcs: list[int]) -> None:
        """Publish filled slots of :meth:`reserve_slots` with their blocks' checksums, under one hold of the
        lock. A block that another put published meanwhile keeps that copy; this slot goes back."""
        # _commit_locked's steps, inlined per block: through it the 64 KiB-block socket thread measured ~0.3 ms
        # more per 16 MiB batch (commit_slots 0.63-0.75 -> 0.97-1.0 ms), a few % of the batch
        with self._lock:
            dram, ssd, ranges, sink, release = self._dram, self._ssd, self._ranges, self.event_sink, self.arena.release
            dram_tier = Tier.DRAM
            for key, slot, size, crc in zip(keys, slots, sizes, crcs, strict=True):
                if key in dram or key in ssd:
                    release(slot)
                    continue
                record = dram[key] = BlockRecord(key, size, crc, b"", dram_tier, slot, 0)
                layers = ranges.get((key.model_id, key.block_hash))  # _index_add
                if layers is None:
                    ranges[(key.model_id, key.block_hash)] = {(key.layer_start, key.layer_end)}
                else:
                    layers.add((key.layer_start, key.layer_end))
                if sink is not None:
                    self._emit(EventKind.STORED, record, dram_tier)

    def release_slots(self, slots) -> None:
        """Give back reserved slots that were never filled (a batch cut off, a block with no room)."""
        with self._lock:
            self.arena.free_list.extend(int(s) for s in slots)

    def _take_slots(self, count: int) -> list[int]:
        """Up to ``count`` free slots, evicting LRU blocks as needed in one batch (fewer when the rest are
        pinned). Called with the lock held."""
        free = self.arena.free_list
        if len(free) < count:
            self._evict_lru(count - len(free))
        take = min(count, len(free))
        slots = free[len(free) - take :]
        del free[len(free) - take :]
        return slots

    def _reserve_locked(self, key: BlockKey, size: int, meta: bytes) -> Reservation | None:
        if not self.block_bytes:
            self._create_arena(size)
        if not 0 < size <= self.block_bytes:
            raise ValueError(f"block of {size} bytes does not fit this store's {self.block_bytes}-byte slots")
        if key in self._dram or key in self._ssd:
            return None
        slot = self._take_slot()
        record = BlockRecord(key=key, size=size, crc=0, meta=meta, tier=Tier.DRAM, slot=slot, pins=1)
        return Reservation(record, self.arena.view(slot, size))

    def commit(self, reservation: Reservation, crc: int | None = None) -> None:
        """Publish a filled reservation; ``crc`` = checksum(view, meta) when the caller computed it
        already."""
        record = reservation.record
        with self._lock:
            self._commit_locked(record, checksum(reservation.view, record.meta) if crc is None else crc)

    def _commit_locked(self, record: BlockRecord, crc: int) -> None:
        record.crc = crc
        record.pins -= 1
        if record.key in self._dram or record.key in self._ssd:  # a concurrent put of the same block won
            self.arena.release(record.slot)
            return
        self._dram[record.key] = record
        self._index_add(record.key)
        self._emit(EventKind.STORED, record, Tier.DRAM)

    def abort(self, reservation: Reservation) -> None:
        with self._lock:
            self.arena.release(reservation.record.slot)

    def put(self, key: BlockKey, data, meta: bytes = b"") -> bool:
        """Store one block (copying it into the arena); False when it was already stored."""
        src = memoryview(data).cast("B")
        reservation = self.reserve(key, len(src), meta)
        if reservation is None:
            return False
        try:
            reservation.view[:] = src
        except BaseException:
            self.abort(reservation)
            raise
        self.commit(reservation)
        return True

    # --- reads ---------------------------------------------------------------------------------------------
    def acquire(self, key: BlockKey, verify: bool = True) -> Lease | None:
        """Pin and verify one block (copying it up from SSD); None on a miss or a failed checksum.

        ``verify=False`` leaves a DRAM block's check to the caller, who must run :meth:`verify` on the lease
        before handing its bytes on as valid (the data server overlaps that check with the send).
        """
        with self._lock:
            record = self._dram.get(key)
            if record is not None:
                record.pins += 1
                self._dram.move_to_end(key)
            else:
                record = self._ssd.get(key)
                if record is None:
                    return None
                record.pins += 1
        if record.tier == Tier.SSD:
            return self._promote(record)
        lease = Lease(record, self.arena.view(record.slot, record.size))
        if verify and not self.verify(lease):
            self.release(lease)
            return None
        return lease

    def verify(self, lease: Lease) -> bool:
        """Check a lease's checksum; a corrupt block is dropped from the store (the lease stays to
        release)."""
        if lease.verified or checksum(lease.view, lease.meta) == lease.record.crc:
            lease.verified = True
            return True
        self._invalidate(lease.record)
        return False

    def acquire_many(self, keys: list[BlockKey], verify: bool = True) -> list[Lease | None]:
        """:meth:`acquire` for a batch: DRAM hits are pinned under one hold of the lock; blocks that must come
        from SSD are read in parallel (the disk serves several reads at once far faster than one after
        another). A block with no free slot to be copied up into is a miss."""
        leases: list[Lease | None] = [None] * len(keys)
        cold: list[int] = []
        with self._lock:
            dram, move_to_end = self._dram, self._dram.move_to_end
            whole = self.arena.region(0, self.arena.capacity_bytes) if self.arena is not None else None
            slot_bytes = self.block_bytes
            for i, record in enumerate(map(dram.get, keys)):  # a 64 KiB-block batch is hundreds of keys
                if record is not None:
                    record.pins += 1
                    move_to_end(record.key)
                    start = record.slot * slot_bytes
                    leases[i] = Lease(record, whole[start : start + record.size])
                elif keys[i] in self._ssd:
                    cold.append(i)
        if verify:
            for i, lease in enumerate(leases):
                if lease is not None and not self.verify(lease):
                    self.release(lease)
                    leases[i] = None
        if len(cold) == 1:
            leases[cold[0]] = self._try_acquire(keys[cold[0]], verify)
        elif cold:
            futures = [_SSD_READERS.submit(self._try_acquire, keys[i], verify) for i in cold]
            for i, future in zip(cold, futures, strict=True):
                leases[i] = future.result()
        return leases

    def _try_acquire(self, key: BlockKey, verify: bool) -> Lease | None:
        try:
            return self.acquire(key, verify)
        except StoreFullError:
            return None

    def release(self, lease: Lease) -> None:
        self.unpin(lease.record)

    def release_many(self, leases: list[Lease | None]) -> None:
        """:meth:`release` for a batch (None entries skipped) under one hold of the lock."""
        with self._lock:
            for lease in leases:
                if lease is not None:
                    self._unpin(lease.record)

    def unpin(self, record: BlockRecord) -> None:
        with self._lock:
            self._unpin(record)

    def get(self, key: BlockKey) -> tuple[bytes, bytes] | None:
        """A copy of (block, metadata), or None: the simple path for tests and tools."""
        lease = self.acquire(key)
        if lease is None:
            return None
        try:
            return bytes(lease.view), lease.meta
        finally:
            self.release(lease)

    def _promote(self, record: BlockRecord) -> Lease | None:
        try:
            with self._lock:
                try:
                    slot = self._take_slot()
                finally:
                    self._count_evictions()
        except StoreFullError:
            with self._lock:
                record.pins -= 1
            raise
        view = self.arena.view(slot, record.size)
        ok = (
            self.ssd.read_into(record, view, self.arena.address(slot))
            and checksum(view, record.meta) == record.crc
        )
        with self._lock:
            record.pins -= 1
            if not ok:
                self.arena.release(slot)
                if self._ssd.get(record.key) is record:
                    self._forget_ssd(record, corrupt=True)
                return None
            if record.key in self._dram:
                # another reader promoted it first; serve our copy once, then give the slot back
                temp = dataclasses.replace(record, tier=Tier.NONE, slot=slot, pins=1)
                return Lease(temp, view, verified=True)
            # copy up, keeping the SSD copy: no unlink on the read path, no rewrite when this block is demoted
            # again, and the block still survives a restart
            promoted = dataclasses.replace(record, tier=Tier.DRAM, slot=slot, pins=1)
            self._dram[record.key] = promoted
            metrics.STORE_PROMOTIONS.inc()
            self._emit(EventKind.STORED, promoted, Tier.DRAM)
        return Lease(promoted, view, verified=True)

    # --- index queries -------------------------------------------------------------------------------------
    def tier_of(self, key: BlockKey) -> Tier:
        with self._lock:
            return self._tier_locked(key)

    def lookup(self, model_id: str, hashes: list[int],
               layer_range: tuple[int, int] | None = None) -> tuple[int, list[Tier]]:
        """(leading blocks present, each block's fastest tier) for one layer range, or with ``layer_range``
        None (or (0, 0)) for any: a block counts when at least one of its layer ranges is stored."""
        exact = layer_range is not None and layer_range != (0, 0)
        with self._lock:
            if exact:
                tiers = [self._tier_locked(BlockKey(model_id, h, *layer_range)) for h in hashes]
            else:
                tiers = [self._any_tier_locked(model_id, h) for h in hashes]
        prefix = next((i for i, t in enumerate(tiers) if t == Tier.NONE), len(tiers))
        return prefix, tiers

    def _tier_locked(self, key: BlockKey) -> Tier:
        return Tier.DRAM if key in self._dram else Tier.SSD if key in self._ssd else Tier.NONE

    def _any_tier_locked(self, model_id: str, block_hash: int) -> Tier:
        ranges = self._ranges.get((model_id, block_hash))
        if not ranges:
            return Tier.NONE
        return min((self._tier_locked(BlockKey(model_id, block_hash, *r)) for r in ranges),
                   key=lambda t: t if t != Tier.NONE else 99)

    def _index_add(self, key: BlockKey) -> None:
        ranges = self._ranges.get((key.model_id, key.block_hash))
        if ranges is None:
            self._ranges[(key.model_id, key.block_hash)] = {(key.layer_start, key.layer_end)}
        else:
            ranges.add((key.layer_start, key.layer_end))

    def _index_drop_if_gone(self, key: BlockKey) -> None:
        if key in self._dram or key in self._ssd:
            return
        ranges = self._ranges.get((key.model_id, key.block_hash))
        if ranges is not None:
            ranges.discard((key.layer_start, key.layer_end))
            if not ranges:
                del self._ranges[(key.model_id, key.block_hash)]

    def stats(self) -> dict[str, int]:
        with self._lock:
            dram_used = sum(r.size for r in self._dram.values())
            return {
                "dram_bytes_used": dram_used,
                "dram_bytes_capacity": self.arena_capacity,
                "ssd_bytes_used": self._ssd_used,
                "ssd_bytes_capacity": self.ssd.capacity_bytes,
                "blocks_dram": len(self._dram),
                "blocks_ssd": len(self._ssd),
                "block_bytes": self.block_bytes,
            }

    def add_arena_listener(self, listener: Callable[[DramArena], None]) -> None:
        """Call ``listener(arena)`` once the arena exists (now, or at the first put when block_bytes is
        auto)."""
        with self._lock:
            self.arena_listeners.append(listener)
            if self.arena is not None:
                listener(self.arena)

    @property
    def arena_capacity(self) -> int:
        return self.arena.capacity_bytes if self.arena else self.dram_capacity_bytes

    def _create_arena(self, block_bytes: int) -> None:
        if block_bytes > self.dram_capacity_bytes:
            raise ValueError(
                f"block_bytes {block_bytes} exceeds dram_capacity_bytes {self.dram_capacity_bytes}"
            )
        self.block_bytes = block_bytes
        self.arena = DramArena(self.dram_capacity_bytes, block_bytes, self.prefault)
        metrics.STORE_BYTES_CAPACITY.labels("dram").set(self.arena.capacity_bytes)
        for listener in self.arena_listeners:
            listener(self.arena)

    def _emit(self, kind: EventKind, record: BlockRecord, tier: Tier, from_tier: Tier = Tier.NONE) -> None:
        if self.event_sink is not None:
            self.event_sink(KvEvent(kind, record.key.model_id, [record.key.block_hash], tier, from_tier))

    def _export_gauges(self) -> None:
        """Occupancy gauges read at scrape time: nothing to update on the data path."""
        metrics.STORE_BLOCKS.labels("dram").set_function(lambda: len(self._dram))
        metrics.STORE_BLOCKS.labels("ssd").set_function(lambda: len(self._ssd))
        metrics.STORE_BYTES_USED.labels("ssd").set_function(lambda: self._ssd_used)
        metrics.STORE_BYTES_USED.labels("dram").set_function(lambda: len(self._dram) * self.block_bytes)
