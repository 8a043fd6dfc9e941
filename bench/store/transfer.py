"""Batched get/put throughput over the raw socket baseline, the ``tcp`` transport and the ``mooncake``
transport.

Every round trip moves one batch of ``batch_bytes`` (``batch_bytes // block_bytes`` blocks of one size); gets
read into one preallocated ``out`` buffer (as a worker reusing its staging memory would); puts use fresh
hashes each time so every block is really stored (the DRAM tier evicts to make room; the SSD tier is off
here). The machine is shared, so the paths are measured interleaved, round after round, and each keeps its
best round: a burst of load elsewhere then cannot favour one path over another.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time

import numpy as np

from bench.store.servers import RawClient, ServerProcess
from crescent.services.kvstore.client import KvStoreClient

LAYERS = (0, 1)


class RawPath:
    def __init__(self, address: str, block_bytes: int, batch_bytes: int):
        self.client = RawClient(address)
        self.batch_bytes = batch_bytes
        self.data = memoryview(np.random.default_rng(0).integers(0, 256, batch_bytes, dtype=np.uint8).data)
        self.out = memoryview(bytearray(batch_bytes))

    def prepare_get(self) -> None:
        pass

    def get(self) -> None:
        self.client.get(self.out)

    def put(self) -> None:
        self.client.put(self.data)

    def close(self) -> None:
        self.client.close()


class StorePath:
    def __init__(self, address: str, transport: str, block_bytes: int, batch_bytes: int):
        count = max(1, batch_bytes // block_bytes)
        self.batch_bytes = count * block_bytes
        # the blocks are views of one batch buffer, as a worker's blocks are views of its paged KV cache, and
        # as the raw path's bytes are one buffer: separate small allocations would leave the tcp client
        # copying from 4 KiB pages while the raw client copies from huge pages (a cost of the benchmark's
        # memory, not of the transport)
        batch = np.random.default_rng(1).integers(0, 256, count * block_bytes, dtype=np.uint8)
        self.blocks = [batch[i * block_bytes : (i + 1) * block_bytes] for i in range(count)]
        self.hashes = list(range(count))
        self.out = memoryview(bytearray(self.batch_bytes))
        self.fresh = itertools.count(1)
        self.client = KvStoreClient.connect(address, transport=transport, timeout_s=120)
        assert self.client.put_blocks("bench", self.hashes, self.blocks, LAYERS) == count
        got = self.client.get_blocks("bench", self.hashes, LAYERS, out=self.out)  # and a correctness check
        assert all(g is not None and bytes(g) == b.tobytes() for g, b in zip(got, self.blocks, strict=True))

    def prepare_get(self) -> None:
        """Make the get batch resident again (put rounds evict it: they store fresh blocks, LRU)."""
        self.client.put_blocks("bench", self.hashes, self.blocks, LAYERS)

    def get(self) -> None:
        got = self.client.get_blocks("bench", self.hashes, LAYERS, out=self.out)
        if any(g is None for g in got):
            raise RuntimeError("a benchmark block was missing: the measurement would not move the bytes")

    def put(self) -> None:
        base = next(self.fresh) * 1_000_000
        self.client.put_blocks("bench", [base + h for h in self.hashes], self.blocks, LAYERS)

    def close(self) -> None:
        self.client.close()


def _rate(fn, batch_bytes: int, min_bytes: int) -> float:
    n = max(2, -(-min_bytes // batch_bytes))
    started = time.perf_counter()
    for _ in range(n):
        fn()
    return n * batch_bytes / (time.perf_counter() - started) / 1e9


def concurrent_gets(address: str, block_bytes: int, batch_bytes: int, clients: int, min_bytes: int) -> float:
    """Aggregate GB/s of ``clients`` threads, each with its own connection, getting the same stored batch."""
    count = max(1, batch_bytes // block_bytes)
    hashes = list(range(count))  # stored by the StorePath that owns this server
    per_client = max(2, -(-min_bytes // (clients * count * block_bytes)))
    barrier = threading.Barrier(clients + 1)
    errors: list[str] = []

    def worker() -> None:
        out = memoryview(bytearray(count * block_bytes))
        with KvStoreClient.connect(address, timeout_s=120) as client:
            barrier.wait()
            for _ in range(per_client):
                if any(g is None for g in client.get_blocks("bench", hashes, LAYERS, out=out)):
                    errors.append("a benchmark block was missing")

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    started = time.perf_counter()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(errors[0])
    return clients * per_client * count * block_bytes / (time.perf_counter() - started) / 1e9


def run_all(block_sizes: list[int], batch_bytes: int, min_bytes: int, rounds: int, clients: int = 8,
            concurrent_size: int = 1 << 20) -> tuple[dict[str, float], list[dict]]:
    """(aggregate GB/s of ``clients`` concurrent getters per server kind, per-path rows)."""
    with contextlib.ExitStack() as stack:
        paths: dict[tuple[str, int], RawPath | StorePath] = {}
        raw = stack.enter_context(ServerProcess("raw", max_bytes=max(batch_bytes, max(block_sizes))))
        for size in block_sizes:
            batch = max(batch_bytes, size)
            paths[("raw", size)] = RawPath(raw.address, size, batch)
            for transport in ("tcp", "mooncake"):  # a store's slots have one size: one server per block size
                server = stack.enter_context(ServerProcess(
                    "kvstore", port=0, data_port=0, metrics_port=0, transport=transport, block_bytes=size,
                    dram_capacity_bytes=3 * batch, ssd_capacity_bytes=0, data_dir=""))
                paths[(transport, size)] = StorePath(server.address, transport, size, batch)
            server = stack.enter_context(
                ServerProcess("asyncio", block_bytes=size, dram_capacity_bytes=3 * batch))
            paths[("tcp-asyncio", size)] = StorePath(server.address, "tcp", size, batch)
        rates: dict[tuple[str, int, str], list[float]] = {}  # every round's rate, in round order
        for _ in range(rounds):
            for (path, size), p in paths.items():
                for op in ("get", "put"):
                    if op == "get":
                        p.prepare_get()
                    rates.setdefault((path, size, op), []).append(_rate(getattr(p, op), p.batch_bytes, min_bytes))
        concurrency: dict[str, float] = {}
        for _ in range(max(1, rounds // 2)):  # alternated too, best round each
            for kind in ("tcp", "tcp-asyncio"):
                path = paths[(kind, concurrent_size)]
                path.prepare_get()
                conn = path.client.transport.conn
                rate = concurrent_gets(f"{conn.host}:{conn.port}", concurrent_size, batch_bytes, clients,
                                       min_bytes)
                concurrency[kind] = max(concurrency.get(kind, 0.0), rate)
        for p in paths.values():
            p.close()
    return concurrency, [{"path": path, "block_bytes": size, "get_gb_per_s": max(rates[(path, size, "get")]),
                          "put_gb_per_s": max(rates[(path, size, "put")]),
                          "get_rounds_gb_per_s": rates[(path, size, "get")],
                          "put_rounds_gb_per_s": rates[(path, size, "put")]} for path, size in paths]
