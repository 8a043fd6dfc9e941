"""Checksums that run beside the data path: on a connection's checksum thread while its socket thread keeps
moving bytes (crc32c and socket calls both release the GIL).

A put checksums each received chunk of a big block in order (chained CRC-32C), and each received group of small
blocks block by block; blocks are published only with the checksum of the bytes that really landed in their
slots. A get verifies the pinned blocks while they are being sent.
"""

from __future__ import annotations

import collections
import threading
from concurrent.futures import Future, ThreadPoolExecutor

from crescent.services.kvstore.blocks import crc_update
from crescent.services.kvstore.store import BlockStore, Lease, Reservation

CRC_CHUNK = 1 << 20  # work handed to the checksum thread at a time (and the largest "small" block)


def verify_all(store: BlockStore, leases: list[Lease | None]) -> list[bool]:
    """:meth:`BlockStore.verify` for a GET batch; a block without metadata is checked inline (three Python
    calls fewer per block, which shows at 64 KiB blocks)."""
    out = []
    for lease in leases:
        if lease is None:
            out.append(False)
        elif not lease.verified and not lease.record.meta and crc_update(lease.view) == lease.record.crc:
            lease.verified = True
            out.append(True)
        else:
            out.append(store.verify(lease))  # metadata, verified already, or a failed check (drops it)
    return out


class CrcBatch:
    """A put's received-but-unpublished blocks and their checksum work, fed to the session's crc thread in
    batches of about CRC_CHUNK bytes (one task per 64 KiB block would cost more than the crc itself).

    Whole blocks go through a :class:`BlockCrcs` queue that the socket thread helps drain once the last byte
    is in, instead of waiting for the crc thread to get a core back (on a busy machine it often has none)."""

    def __init__(self, executor: ThreadPoolExecutor):
        self.executor = executor
        self.reservations: list[tuple[Reservation, CrcChain]] = []
        self.blocks: list[Reservation] = []  # whole blocks: their checksum goes to record.crc
        self.block_crcs = BlockCrcs()
        self.work: list[tuple[CrcChain, memoryview]] = []
        self.work_bytes = 0

    def add(self, chain: CrcChain, chunk: memoryview) -> None:
        self.work.append((chain, chunk))
        self.work_bytes += len(chunk)
        if self.work_bytes >= CRC_CHUNK:
            self._submit()

    def add_blocks(self, group: list[Reservation], nbytes: int) -> None:
        """Whole received blocks without metadata, in consecutive slots of one size: checksummed in pieces of
        about CRC_CHUNK bytes (no task per block); each block's checksum lands in its (still unpublished)
        record."""
        self.blocks += group
        per_item = max(1, CRC_CHUNK * len(group) // max(nbytes, 1))
        for at in range(0, len(group), per_item):
            self.block_crcs.items.append(group[at : at + per_item])
        self.executor.submit(self.block_crcs.drain)

    def _submit(self) -> Future:
        work, self.work, self.work_bytes = self.work, [], 0
        return self.executor.submit(_run_crc, work)

    def commit(self, store: BlockStore) -> None:
        chained = self._submit() if self.work or self.reservations else None
        self.block_crcs.finish()  # the whole blocks: what the crc thread has not started, done here
        if chained is not None:
            chained.result()  # FIFO: every earlier chunk of a big block is checksummed once this returns
        if self.reservations:
            store.commit_many([(reservation, chain.value) for reservation, chain in self.reservations])
        store.commit_checksummed(self.blocks)
        self.reservations.clear()
        self.blocks.clear()

    def abort(self, store: BlockStore) -> None:
        self._submit().exception()  # let queued checksums finish before the slots are freed
        self.block_crcs.items.clear()
        self.block_crcs.finish()
        for reservation, _ in self.reservations:
            store.abort(reservation)
        for reservation in self.blocks:
            store.abort(reservation)
        self.reservations.clear()
        self.blocks.clear()


class BlockCrcs:
    """Groups of received whole blocks waiting for their checksums, drained by whichever thread gets there
    first: the connection's crc thread while the socket thread receives, then the socket thread itself for
    what is left when the batch is in. Each group is taken by exactly one thread."""

    def __init__(self):
        self.items: collections.deque[list[Reservation]] = collections.deque()
        self.busy = 0  # groups being checksummed right now
        self.done = threading.Condition()

    def drain(self) -> None:
        while True:
            try:
                group = self.items.popleft()  # atomic: two threads never take the same group
            except IndexError:
                return
            with self.done:
                self.busy += 1
            try:
                for reservation in group:  # unpublished: nobody else reads record.crc yet
                    reservation.record.crc = crc_update(reservation.view)
            finally:
                with self.done:
                    self.busy -= 1
                    self.done.notify_all()

    def finish(self) -> None:
        """Checksum what is still queued here, then wait for the groups the other thread is on."""
        self.drain()
        with self.done:
            self.done.wait_for(lambda: self.busy == 0)


def _run_crc(work: list[tuple[CrcChain, memoryview]]) -> None:
    for chain, chunk in work:
        chain.update(chunk)


class CrcChain:
    """A CRC-32C built chunk by chunk on the session's checksum thread."""

    def __init__(self, start: int):
        self.value = start

    def update(self, chunk: memoryview) -> None:
        self.value = crc_update(chunk, self.value)
