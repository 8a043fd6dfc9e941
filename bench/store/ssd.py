"""SSD tier reads against a plain sequential read of one equally large file, both from the disk (not page
cache).

The tier's blocks are written by demotion (a store with a one-slot DRAM tier), then a fresh store is opened on
the directory for each pass (the restart path: every block on SSD, an empty prefaulted arena, so reads copy
blocks up without demoting anything). Before each timed read every file's pages are dropped from the page
cache with posix_fadvise(DONTNEED) (the files were fsynced, so their pages are clean and really dropped; no
root needed).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from crescent.services.kvstore.blocks import BlockKey
from crescent.services.kvstore.store import BlockStore


def _drop_cache(paths) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def ssd_tier_vs_plain_read(
    root: Path, block_bytes: int, n_blocks: int, batch: int = 16, repeats: int = 3
) -> dict:
    """Best of ``repeats`` cold passes each."""
    data = np.random.default_rng(0).integers(0, 256, block_bytes, dtype=np.uint8)
    keys = [BlockKey("bench", h, 0, 1) for h in range(n_blocks)]
    writer = BlockStore(block_bytes, (n_blocks + 1) * block_bytes * 2, root / "tier", block_bytes=block_bytes)
    for key in keys:
        data[:8] = np.frombuffer(key.block_hash.to_bytes(8, "little"), np.uint8)
        writer.put(key, data)
    writer.put(BlockKey("bench", 1 << 40, 0, 1), data)  # pushes the last real block to SSD too
    plain = root / "plain.bin"
    with open(plain, "wb") as f:
        for _ in range(n_blocks):
            f.write(data.tobytes())
        f.flush()
        os.fsync(f.fileno())
    tier_files = [str(p) for p in (root / "tier").glob("*/*.blk")]
    out = memoryview(bytearray(block_bytes))
    tier_s, plain_s = [], []
    for _ in range(repeats):  # interleaved; a restart each time, so every read comes from SSD again
        store = BlockStore(
            (n_blocks + 2) * block_bytes, (n_blocks + 1) * block_bytes * 2, root / "tier", prefault=True
        )
        _drop_cache(tier_files)
        started = time.perf_counter()
        for start in range(0, n_blocks, batch):  # batched gets, as the data server serves them
            for lease in store.acquire_many(keys[start : start + batch]):
                assert lease is not None, "SSD block missing in the benchmark"
                store.release(lease)  # read from disk into a DRAM slot and checksummed: ready to send
        tier_s.append(time.perf_counter() - started)
        del store
        _drop_cache([str(plain)])
        started = time.perf_counter()
        with open(plain, "rb", buffering=0) as f:
            while f.readinto(out):
                pass
        plain_s.append(time.perf_counter() - started)
    total = n_blocks * block_bytes
    tier_gbs, plain_gbs = total / min(tier_s) / 1e9, total / min(plain_s) / 1e9
    return {
        "block_bytes": block_bytes,
        "n_blocks": n_blocks,
        "batch": batch,
        "repeats": repeats,
        "bytes": total,
        "tier_gb_per_s": tier_gbs,
        "plain_read_gb_per_s": plain_gbs,
        "ratio": tier_gbs / plain_gbs,
    }
