"""The put path for a batch of many small blocks without metadata (64 KiB - 1 MiB KV blocks).

The socket thread reserves a run of ``RUN_BLOCKS`` slots (slot numbers only: nothing is made per block) and
receives blocks that landed in consecutive slots with one ``recv_into`` of up to ``GROUP_BYTES``. Right after a
group lands, while its bytes are still in cache, the same thread checksums its blocks and publishes them; the
client meanwhile goes on sending into the socket's receive buffer, so the checksums cost the transfer little.
(Handing the checksums to another thread measured slower: on a loaded machine that thread falls behind, and
the answer then waits for the backlog.) The connection's helper thread reserves run k+1 while run k arrives.

A block is published once all its bytes are in and checksummed, never before: a client that disconnects
mid-batch leaves the blocks of every receive group that arrived whole (valid, content-addressed) and nothing
half-written; every slot reserved and not filled goes back. A run that finds the store full of pinned slots first receives and publishes
what fits (this batch's own blocks may be what pins the rest) and retries once.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from crescent.services.kvstore import wire as p
from crescent.services.kvstore.blocks import BlockKey, crc_update
from crescent.services.kvstore.store import SLOT_EXISTS, SLOT_FULL, BlockStore

RUN_BLOCKS = 256  # small blocks reserved per lock hold (and per step of the receive/reserve pipeline)
# bytes per recv: 1 MiB groups measured best at 64 KiB and 1 MiB blocks (against 512 KiB, 2 and 4 MiB): few
# wake-ups for the socket thread, and each group is still in cache when it is checksummed
GROUP_BYTES = 1 << 20


class SmallBlockPut:
    def __init__(self, store: BlockStore, sock, scratch: memoryview, helper: ThreadPoolExecutor):
        self.store, self.sock, self.scratch = store, sock, scratch
        self.helper = helper  # the connection's helper thread

    def run(self, keys: list[BlockKey], sizes: list[int], statuses: np.ndarray) -> None:
        n = len(keys)
        start, retried = 0, False
        ahead: tuple[int, Future] | None = None  # the next run's reservation, made while this one arrives
        try:
            while start < n:
                stop = min(n, start + RUN_BLOCKS)
                if ahead is not None and ahead[0] == start:
                    slots = ahead[1].result()
                else:
                    slots = self.store.reserve_slots(keys[start:stop], sizes[start:stop])
                ahead = None
                full = np.flatnonzero(slots == SLOT_FULL)
                if len(full) and not retried:
                    cut = int(full[0])
                    self.store.release_slots(slots[cut:][slots[cut:] >= 0])
                    self._receive_run(keys, start, slots[:cut], sizes, statuses)  # published, and unpinned
                    start, retried = start + cut, True
                    continue
                if stop < n:
                    nxt = min(n, stop + RUN_BLOCKS)
                    ahead = (stop, self.helper.submit(self.store.reserve_slots, keys[stop:nxt], sizes[stop:nxt]))
                self._receive_run(keys, start, slots, sizes, statuses)
                start, retried = stop, False
        except BaseException:
            if ahead is not None and ahead[1].exception() is None:
                unused = ahead[1].result()
                self.store.release_slots(unused[unused >= 0])  # reserved ahead, never received
            raise

    def _receive_run(self, keys: list[BlockKey], start: int, slots: np.ndarray, sizes: list[int],
                     statuses: np.ndarray) -> None:
        """Receive and publish one run's blocks: a group in consecutive slots with one recv, a block that has
        no slot (stored already, or no room) drained."""
        handed = 0  # slots[:handed] are published or given back (or were never reservations)
        run_sizes = sizes[start : start + len(slots)]
        arena = self.store.arena
        try:
            whole, slot_bytes = arena.region(0, arena.capacity_bytes), arena.slot_bytes
            for lo, hi in _groups(slots, run_sizes, slot_bytes):
                slot = int(slots[lo])
                if slot >= 0:
                    group_slots, group_sizes = slots[lo:hi].tolist(), run_sizes[lo:hi]
                    p.recv_into_exact(self.sock, arena.span(slot, sum(group_sizes)))
                    crcs = [crc_update(whole[s * slot_bytes : s * slot_bytes + n])
                            for s, n in zip(group_slots, group_sizes, strict=True)]
                    handed = hi  # from here on these slots are the index's (or given back by it)
                    self.store.commit_slots(keys[start + lo : start + hi], group_slots, group_sizes, crcs)
                    statuses[start + lo : start + hi] = p.BlockStatus.HIT
                else:
                    p.drain(self.sock, run_sizes[lo], self.scratch)
                    statuses[start + lo] = p.BlockStatus.EXISTS if slot == SLOT_EXISTS else p.BlockStatus.FULL
                handed = hi
        except BaseException:
            rest = slots[handed:]
            self.store.release_slots(rest[rest >= 0])
            raise


def _groups(slots: np.ndarray, sizes: list[int], slot_bytes: int) -> list[tuple[int, int]]:
    """[lo, hi) index ranges of ``slots`` to receive with one recv each: reserved slots in consecutive order
    (all but the last of full slot size, so their bytes are contiguous), at most GROUP_BYTES of them; every
    unreserved entry alone. Computed with array operations: a per-block Python loop shows at 64 KiB blocks."""
    n = len(slots)
    if n == 0:
        return []
    joins = (slots[1:] == slots[:-1] + 1) & (slots[:-1] >= 0) & (np.asarray(sizes[:-1]) == slot_bytes)
    bounds = [0, *(np.flatnonzero(~joins) + 1).tolist(), n]
    per_group = max(1, GROUP_BYTES // slot_bytes)
    return [(a, min(a + per_group, hi)) for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)
            for a in range(lo, hi, per_group)]
