"""How blocks leave the DRAM tier: LRU eviction (demotion to SSD, or a drop without one), SSD capacity, a
corrupt block's removal, the low watermark kept after batch puts, and the steps of the shutdown flush
(:mod:`flush`). A mixin of :class:`store.BlockStore`, on the store's state: the public methods take the store's
lock, the private ones run with it held by their caller.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging

from crescent.services.common import metrics
from crescent.services.kvstore.blocks import BlockRecord, EventKind, StoreFullError, Tier, checksum

log = logging.getLogger(__name__)
_DRAM_EVICTIONS = metrics.STORE_EVICTIONS.labels("dram")  # resolved once: labels() costs more than inc()


def _unpinned(record: BlockRecord) -> bool:
    return record.pins == 0


class TierMoves:
    # --- eviction ------------------------------------------------------------------------------------------
    def keep_free(self, slots: int) -> int:
        """Demote LRU unpinned blocks until ``slots`` slots are free (at most a quarter of the arena); returns
        how many were demoted. Called after a batch put has been answered, so the next batch's reservation
        finds free slots instead of evicting on the request path (a low watermark of free slots)."""
        if self.arena is None:
            return 0
        target = min(slots, self.arena.num_slots // 4)
        with self._lock:
            demoted = self._evict_lru(target - self.arena.free_slots)
            self._count_evictions()
        return demoted

    def _take_slot(self) -> int:
        """A free slot, demoting LRU unpinned DRAM blocks to SSD as needed. Called with the lock held."""
        slot = self.arena.allocate()
        while slot is None:
            if not self._evict_lru(1):
                raise StoreFullError("every DRAM slot is held by an in-flight transfer; retry")
            slot = self.arena.allocate()
        return slot

    def _evict_lru(self, count: int) -> int:
        """Demote (or drop) up to ``count`` least recently used unpinned DRAM blocks; returns how many.

        The victims are picked in one pass over the LRU order: a batch put frees hundreds of slots at a time,
        and restarting the scan per victim would walk past the same pinned blocks again and again."""
        if count <= 0:
            return 0
        victims = list(itertools.islice(filter(_unpinned, self._dram.values()), count))
        if self.ssd.capacity_bytes <= 0 and self.event_sink is None:
            self._drop_many(victims)  # a DRAM-only store with nobody to tell: the short path
        else:
            for victim in victims:
                self._demote(victim)
        return len(victims)

    def _drop_many(self, victims: list[BlockRecord]) -> None:
        """:meth:`_demote` for a store without an SSD tier or an event sink: free the slots, unindex."""
        dram, release = self._dram, self.arena.release
        for record in victims:
            del dram[record.key]
            release(record.slot)
            record.tier = Tier.NONE
            self._index_drop_if_gone(record.key)
        self._dram_evictions += len(victims)

    def _demote(self, record: BlockRecord) -> None:
        del self._dram[record.key]
        self._dram_evictions += 1  # into the metric once per locked batch (an inc per block shows at 64 KiB)
        if record.key in self._ssd or record.size > self.ssd.capacity_bytes:
            # promoted earlier (its SSD copy is still there) or no SSD tier: nothing to write
            self._emit(EventKind.EVICTED, record, Tier.DRAM)
        elif checksum(view := self.arena.view(record.slot, record.size), record.meta) != record.crc:
            metrics.STORE_CORRUPT.labels("dram").inc()
            self._emit(EventKind.EVICTED, record, Tier.DRAM)
        elif self._ssd_room(record.size):
            try:
                self.ssd.write(record, view)
            except OSError as exc:
                log.error("demotion to SSD failed, dropping block: %s", exc)
                metrics.STORE_CLIENT_ERRORS.labels("ssd_write").inc()
                self._emit(EventKind.EVICTED, record, Tier.DRAM)
            else:
                self.arena.release(record.slot)
                record.tier, record.slot = Tier.SSD, -1
                self._ssd[record.key] = record
                self._ssd_used += record.size
                self._emit(EventKind.MOVED, record, Tier.SSD, Tier.DRAM)
                return
        else:
            self._emit(EventKind.EVICTED, record, Tier.DRAM)
        self.arena.release(record.slot)
        record.tier = Tier.NONE
        self._index_drop_if_gone(record.key)

    def _count_evictions(self) -> None:
        if self._dram_evictions:
            _DRAM_EVICTIONS.inc(self._dram_evictions)
            self._dram_evictions = 0

    def _ssd_room(self, size: int, spare_dram_copies: bool = False) -> bool:
        """Make room on SSD for ``size`` bytes by dropping LRU unpinned blocks; False if it cannot fit.
        ``spare_dram_copies`` keeps the SSD copies of blocks also in DRAM (a flush relies on them)."""
        if size > self.ssd.capacity_bytes:
            return False
        while self._ssd_used + size > self.ssd.capacity_bytes:
            victim = next((r for r in self._ssd.values()
                           if r.pins == 0 and not (spare_dram_copies and r.key in self._dram)), None)
            if victim is None:
                return False
            metrics.STORE_EVICTIONS.labels("ssd").inc()
            self._forget_ssd(victim, corrupt=False)
            self._emit(EventKind.EVICTED, victim, Tier.SSD)
        return True

    def _forget_ssd(self, record: BlockRecord, corrupt: bool) -> None:
        del self._ssd[record.key]
        self._ssd_used -= record.size
        self.ssd.delete(record.key)
        self._index_drop_if_gone(record.key)
        if corrupt:
            metrics.STORE_CORRUPT.labels("ssd").inc()
            self._emit(EventKind.EVICTED, record, Tier.SSD)

    def _invalidate(self, record: BlockRecord) -> None:
        log.error("block %s failed its checksum in DRAM; dropped", record.key)
        with self._lock:
            metrics.STORE_CORRUPT.labels("dram").inc()
            if self._dram.get(record.key) is record:
                del self._dram[record.key]
                record.tier = Tier.NONE
                self._index_drop_if_gone(record.key)
                self._emit(EventKind.EVICTED, record, Tier.DRAM)

    def _unpin(self, record: BlockRecord) -> None:
        record.pins -= 1
        if record.pins == 0 and record.tier == Tier.NONE and record.slot >= 0:
            self.arena.release(record.slot)  # dropped or a one-off promoted copy: its slot is free now
            record.slot = -1

    # --- shutdown flush (see flush.py) ------------------------------------------------------------------------
    def pin_dram_only(self) -> tuple[list[BlockRecord], int]:
        """Pin every DRAM block that has no SSD copy, most recently used first; and count those that have
        one."""
        pinned: list[BlockRecord] = []
        on_ssd = 0
        with self._lock:
            for key, record in reversed(self._dram.items()):
                if key in self._ssd:
                    on_ssd += 1
                    continue
                record.pins += 1
                pinned.append(record)
        return pinned, on_ssd

    def claim_ssd_room(self, size: int) -> bool:
        """Reserve ``size`` bytes of SSD capacity, dropping LRU SSD-only blocks (all older than any DRAM
        block); False when only blocks that are also in DRAM (or pinned) are left to drop."""
        with self._lock:
            if not self._ssd_room(size, spare_dram_copies=True):
                return False
            self._ssd_used += size
            return True

    def return_ssd_room(self, size: int) -> None:
        with self._lock:
            self._ssd_used -= size

    def add_ssd_copy(self, record: BlockRecord) -> None:
        """Index the SSD copy just written of DRAM block ``record`` (whose room was claimed)."""
        with self._lock:
            if record.key in self._ssd:  # written twice (cannot happen at shutdown): keep one
                self._ssd_used -= record.size
                return
            copy = dataclasses.replace(record, tier=Tier.SSD, slot=-1, pins=0)
            self._ssd[record.key] = copy
            self._emit(EventKind.STORED, copy, Tier.SSD)
