"""Checksums that run beside the data path: on a connection's checksum thread while its socket thread keeps
moving bytes (crc32c and socket calls both release the GIL).

A put checksums each received chunk of a big block in order (chained CRC-32C), and each received group of small
blocks block by block; blocks are published only with the checksum of the bytes that really landed in their
slots. A get verifies the pinned blocks while they are being sent.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

from crescent.services.kvstore.blocks import crc_update
from crescent.services.kvstore.store import BlockStore, Lease, Reservation

CRC_CHUNK = 1 << 20  # work handed to the checksum thread at a time (and the largest "small" block)


def verify_all(store: BlockStore, leases: list[Lease | None]) -> list[bool]:
    return [lease is not None and store.verify(lease) for lease in leases]


class CrcBatch:
    """A put's received-but-unpublished blocks and their checksum work, fed to the session's crc thread in
    batches of about CRC_CHUNK bytes (one task per 64 KiB block would cost more than the crc itself)."""

    def __init__(self, executor: ThreadPoolExecutor):
        self.executor = executor
        self.reservations: list[tuple[Reservation, CrcChain]] = []
        self.blocks: list[Reservation] = []  # whole blocks: their checksum goes to record.crc
        self.work: list[tuple[CrcChain | None, object]] = []
        self.work_bytes = 0

    def add(self, chain: CrcChain, chunk: memoryview) -> None:
        self.work.append((chain, chunk))
        self.work_bytes += len(chunk)
        if self.work_bytes >= CRC_CHUNK:
            self._submit()

    def add_blocks(self, group: list[Reservation], nbytes: int) -> None:
        """Whole received blocks without metadata: one work item for the group (no object per block); each
        block's checksum lands in its (still unpublished) record."""
        self.work.append((None, group))
        self.blocks += group
        self.work_bytes += nbytes
        if self.work_bytes >= CRC_CHUNK:
            self._submit()

    def _submit(self) -> Future:
        work, self.work, self.work_bytes = self.work, [], 0
        return self.executor.submit(_run_crc, work)

    def commit(self, store: BlockStore) -> None:
        self._submit().result()  # FIFO: every earlier chunk is checksummed once this returns
        store.commit_many([(reservation, chain.value) for reservation, chain in self.reservations]
                          + [(reservation, reservation.record.crc) for reservation in self.blocks])
        self.reservations.clear()
        self.blocks.clear()

    def abort(self, store: BlockStore) -> None:
        self._submit().exception()  # let queued checksums finish before the slots are freed
        for reservation, _ in self.reservations:
            store.abort(reservation)
        for reservation in self.blocks:
            store.abort(reservation)
        self.reservations.clear()
        self.blocks.clear()


def _run_crc(work: list[tuple[CrcChain | None, object]]) -> None:
    for chain, item in work:
        if chain is None:
            for reservation in item:  # unpublished: nobody else reads record.crc yet
                reservation.record.crc = crc_update(reservation.view)
        else:
            chain.update(item)


class CrcChain:
    """A CRC-32C built chunk by chunk on the session's checksum thread."""

    def __init__(self, start: int):
        self.value = start

    def update(self, chunk: memoryview) -> None:
        self.value = crc_update(chunk, self.value)
