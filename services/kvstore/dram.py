"""The DRAM tier's arena: one preallocated buffer cut into equal slots, one block per slot.

Fixed-size slots make allocation a free-list pop (no fragmentation, no allocator on the data path) and give
every block a stable address, which the Mooncake transport registers once and reads and writes directly.
"""

from __future__ import annotations

import mmap

import numpy as np


class DramArena:
    def __init__(self, capacity_bytes: int, slot_bytes: int, prefault: bool = False):
        if slot_bytes <= 0:
            raise ValueError(f"slot_bytes must be positive, got {slot_bytes}")
        self.slot_bytes = slot_bytes
        self.num_slots = capacity_bytes // slot_bytes
        # an anonymous mmap: page-aligned (slots of a multiple of 4 KiB can take O_DIRECT reads from the SSD
        # tier), backed by transparent huge pages where the kernel allows: an O_DIRECT read into 4 KiB pages
        # needs one scatter-gather segment per page and the disk caps segments per request (254 on virtio-blk,
        # i.e. ~1 MiB requests), while 2 MiB pages let one block go down as a few large requests (the SSD
        # tier's reads measured ~1.8x faster, at the speed of a plain buffered sequential read).
        self._mmap = mmap.mmap(-1, max(self.num_slots, 1) * slot_bytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        _advise_huge_pages(self._mmap)
        self.buffer = np.frombuffer(self._mmap, dtype=np.uint8)
        self._view = memoryview(self.buffer)
        if prefault:
            # commit every page now (after the advice, so they come as huge pages), so no transfer ever pays
            # a page fault, at the cost of holding the whole capacity in RAM from the start (what an operator
            # sizing a cache node expects); a write per page is what MAP_POPULATE does to a private mapping
            self.buffer[:: mmap.PAGESIZE] = 0
        self._free = list(range(self.num_slots - 1, -1, -1))

    @property
    def base_address(self) -> int:
        return int(self.buffer.ctypes.data)

    @property
    def capacity_bytes(self) -> int:
        return self.num_slots * self.slot_bytes

    @property
    def free_slots(self) -> int:
        return len(self._free)

    @property
    def free_list(self) -> list[int]:
        """The free slots (the store pops from it under its lock, in batch reservations)."""
        return self._free

    def allocate(self) -> int | None:
        """A free slot, or None when the arena is full (the caller evicts first)."""
        return self._free.pop() if self._free else None

    def release(self, slot: int) -> None:
        self._free.append(slot)

    def view(self, slot: int, size: int) -> memoryview:
        """The first ``size`` bytes of ``slot``, writable, without a copy."""
        start = slot * self.slot_bytes
        return self._view[start : start + size]

    def span(self, slot: int, nbytes: int) -> memoryview:
        """``nbytes`` from the start of ``slot`` on, across consecutive slots (one recv for many blocks)."""
        start = slot * self.slot_bytes
        return self._view[start : start + nbytes]

    def region(self, start: int, nbytes: int) -> memoryview:
        """``nbytes`` of the arena from byte offset ``start`` (a run of whole blocks in consecutive slots)."""
        return self._view[start : start + nbytes]

    def address(self, slot: int) -> int:
        return self.base_address + slot * self.slot_bytes


def _advise_huge_pages(region: mmap.mmap) -> None:
    """Ask for transparent huge pages; a kernel without them (or with them off) keeps 4 KiB pages."""
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is None:
        return
    try:
        region.madvise(advice)
    except OSError:
        pass
