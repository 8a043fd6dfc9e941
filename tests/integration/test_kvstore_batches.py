"""Batched puts over tcp: the reserve-ahead pipeline across runs of small blocks, a store full of this batch's own
blocks, a client that disconnects with a run reserved ahead (what arrived whole is kept, no slot leaks),
concurrent puts of the same blocks, and big blocks received and checksummed chunk by chunk."""

from __future__ import annotations

import socket
import threading
import time

import numpy as np
import pytest

from crescent.services.kvstore import small_puts
from crescent.services.kvstore import wire as p
from crescent.services.kvstore.client import KvStoreClient
from crescent.services.kvstore.server import run_in_thread
from crescent.services.kvstore.settings import KvStoreSettings

BLOCK = 4096
LAYERS = (0, 2)


def block(seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, BLOCK, dtype=np.uint8).tobytes()


@pytest.fixture
def small_runs(monkeypatch):
    # runs of 8 blocks, groups of 3: a 20-block batch takes three runs, two of them reserved ahead
    monkeypatch.setattr(small_puts, "RUN_BLOCKS", 8)
    monkeypatch.setattr(small_puts, "GROUP_BYTES", 3 * BLOCK)


def start(tmp_path, dram_blocks: int):
    return run_in_thread(KvStoreSettings(
        port=0, data_port=0, metrics_port=0, dram_capacity_bytes=dram_blocks * BLOCK, ssd_capacity_bytes=0,
        data_dir=str(tmp_path / "ssd"), block_bytes=BLOCK, io_timeout_s=2.0, drain_timeout_s=1.0))


def test_multi_run_batch_with_stored_blocks_mixed_in(tmp_path, small_runs):
    handle = start(tmp_path, dram_blocks=64)
    try:
        with KvStoreClient.connect(handle.data_address, verify_checksums=True) as client:
            assert client.put_blocks("m", [5, 11, 17], [block(h) for h in (5, 11, 17)], LAYERS) == 3
            hashes = list(range(20))
            assert client.put_blocks("m", hashes, [block(h) for h in hashes], LAYERS) == 20
            got = client.get_blocks("m", hashes, LAYERS)
            assert [bytes(g) for g in got] == [block(h) for h in hashes]
        assert handle.store.stats()["blocks_dram"] == 20
    finally:
        handle.stop()


def test_batch_larger_than_the_free_slots_publishes_its_runs_and_goes_on(tmp_path, small_runs):
    # 16 slots, 24 blocks: the third run finds every slot pinned by this batch's own uncommitted blocks
    handle = start(tmp_path, dram_blocks=16)
    try:
        with KvStoreClient.connect(handle.data_address) as client:
            hashes = list(range(100, 124))
            assert client.put_blocks("m", hashes, [block(h) for h in hashes], LAYERS) == 24
            # LRU kept the last 16; after the answer the low watermark frees a quarter of the slots
            got = client.get_blocks("m", hashes[12:], LAYERS)
            assert [bytes(g) for g in got] == [block(h) for h in hashes[12:]]
        assert handle.store.arena.free_slots == 4 and handle.store.stats()["blocks_dram"] == 12
    finally:
        handle.stop()


def test_disconnect_with_a_run_reserved_ahead_leaks_no_slot(tmp_path, small_runs):
    handle = start(tmp_path, dram_blocks=64)
    try:
        free_before = handle.store.arena.free_slots
        n = 20
        req = p.BlockRequest("m", *LAYERS, np.arange(200, 200 + n, dtype=np.uint64),
                             np.full(n, BLOCK, np.uint64), np.zeros(n, np.uint32))
        body = req.encode()
        host, port = handle.data_address.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            payload = b"".join(block(h) for h in range(200, 210)) + block(210)[: BLOCK // 2]
            sock.sendall(p.pack_header(p.Op.PUT, n, len(body), n * BLOCK) + body + payload)
        # the server may not have taken the connection yet (a busy machine): wait for its first run to be published,
        # then for the connection to be gone
        deadline = time.monotonic() + 10
        while handle.store.stats()["blocks_dram"] < 8 and time.monotonic() < deadline:
            time.sleep(0.02)
        while handle.data.active_connections and time.monotonic() < deadline:
            time.sleep(0.02)
        assert handle.data.active_connections == 0
        with KvStoreClient.connect(handle.data_address, verify_checksums=True) as client:
            got = client.get_blocks("m", list(range(200, 220)), LAYERS)
        # what arrived in whole receive groups is published intact (runs of 8 in groups of 3: at least 200-207);
        # the half block, and the blocks received with it, never are
        published = sum(g is not None for g in got)
        assert 8 <= published <= 10 and got[published:] == [None] * (n - published)
        assert [bytes(g) for g in got[:published]] == [block(h) for h in range(200, 200 + published)]
        # every slot reserved for this batch and not published, in this run or reserved ahead, is given back
        assert handle.store.arena.free_slots == free_before - published
    finally:
        handle.stop()


def test_concurrent_batches_of_the_same_blocks_store_each_once_and_leak_no_slot(tmp_path, small_runs):
    """Four connections put overlapping batches at once (runs of 8, groups of 3): every block ends up stored
    once and intact; each slot a losing put reserved goes back."""
    handle = start(tmp_path, dram_blocks=64)
    errors: list[str] = []
    barrier = threading.Barrier(4)

    def writer(offset: int) -> None:
        hashes = [300 + (offset + i) % 40 for i in range(40)]  # the same 40 blocks, each in its own order
        try:
            with KvStoreClient.connect(handle.data_address, timeout_s=10) as client:
                barrier.wait(5)
                for _ in range(3):  # bounded: three rounds each
                    if client.put_blocks("m", hashes, [block(h) for h in hashes], LAYERS) != 40:
                        errors.append(f"writer {offset}: not every block was stored")
        except Exception as exc:  # reported below: a thread's failure must fail the test
            errors.append(f"writer {offset}: {exc!r}")

    threads = [threading.Thread(target=writer, args=(k * 10,)) for k in range(4)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not any(t.is_alive() for t in threads) and errors == []
        with KvStoreClient.connect(handle.data_address, verify_checksums=True) as client:
            got = client.get_blocks("m", list(range(300, 340)), LAYERS)
        assert [bytes(g) for g in got] == [block(h) for h in range(300, 340)]
        stats = handle.store.stats()
        assert stats["blocks_dram"] == 40 and handle.store.arena.free_slots == 64 - 40
    finally:
        handle.stop()


def test_big_blocks_are_received_and_checksummed_chunk_by_chunk(tmp_path):
    """Blocks over 1 MiB (one receive and checksum step) take the per-block path: with and without metadata,
    a short last block, every byte back intact and the stored checksum the whole block's."""
    from crescent.services.kvstore.blocks import BlockKey, checksum

    big = (5 << 20) // 2  # 2.5 MiB: two whole chunks and a half one
    handle = run_in_thread(KvStoreSettings(
        port=0, data_port=0, metrics_port=0, dram_capacity_bytes=8 * big, ssd_capacity_bytes=0,
        data_dir=str(tmp_path / "ssd"), block_bytes=big, io_timeout_s=5.0, drain_timeout_s=1.0))
    try:
        blocks = [np.random.default_rng(h).integers(0, 256, n, dtype=np.uint8).tobytes()
                  for h, n in ((1, big), (2, big), (3, big - 12345))]
        with KvStoreClient.connect(handle.data_address, verify_checksums=True) as client:
            assert client.put_blocks("m", [1, 2, 3], blocks, LAYERS) == 3
            assert client.put_blocks("m", [4], [blocks[0]], LAYERS, metas=[b"centroids"]) == 1
            got = client.get_blocks_with_meta("m", [1, 2, 3, 4], LAYERS)
        assert [bytes(g.data) for g in got] == [*blocks, blocks[0]]
        assert [g.meta for g in got] == [b"", b"", b"", b"centroids"]
        record = handle.store._dram[BlockKey("m", 4, *LAYERS)]
        assert record.crc == checksum(blocks[0], b"centroids")
    finally:
        handle.stop()
