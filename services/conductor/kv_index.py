"""Where each prefix block's KV lives: per instance (a worker's device cache, a store's DRAM or SSD tier).

Fed by the KV events workers and stores report. A block is identified by its chained prefix hash
(crescent.hashing), so "instance X holds blocks h[0..n)" means X can reuse an n-block prefix.
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Sequence

from crescent.services.conductor.cluster import Tier


class KvEventKind(enum.IntEnum):
    """Values equal crescent.v1.KvEvent.Kind."""

    STORED = 1
    EVICTED = 2
    MOVED = 3


class KvIndex:
    """In-memory block index. ``RedisKvIndex`` has the same methods for several conductor replicas."""

    def __init__(self) -> None:
        self._blocks: dict[str, dict[int, Tier]] = {}
        self._lock = threading.Lock()

    def apply(self, instance_id: str, kind: KvEventKind, hashes: Sequence[int], tier: Tier,
              from_tier: Tier | None = None) -> None:
        """Apply one event. A block lives in one tier per instance: the one last reported."""
        with self._lock:
            blocks = self._blocks.setdefault(instance_id, {})
            if kind == KvEventKind.STORED:
                for h in hashes:
                    blocks[h] = tier
            elif kind == KvEventKind.EVICTED:
                # Only forget blocks still in the tier they were evicted from: a block demoted DRAM->SSD is
                # reported as MOVED, and a late EVICTED for the old tier must not erase the new copy.
                for h in hashes:
                    if blocks.get(h) == tier:
                        del blocks[h]
            elif kind == KvEventKind.MOVED:
                for h in hashes:
                    if from_tier is None or blocks.get(h, from_tier) == from_tier:
                        blocks[h] = tier
            else:
                raise ValueError(f"unknown KV event kind {kind!r}")

    def prefix_tiers(self, instance_id: str, hashes: Sequence[int]) -> list[Tier]:
        """Tiers of the leading run of ``hashes`` that ``instance_id`` holds (its reusable prefix)."""
        with self._lock:
            blocks = self._blocks.get(instance_id, {})
            out: list[Tier] = []
            for h in hashes:
                tier = blocks.get(h)
                if tier is None:
                    break
                out.append(tier)
            return out

    def longest_prefix(self, instance_id: str, hashes: Sequence[int]) -> int:
        return len(self.prefix_tiers(instance_id, hashes))

    def drop_instance(self, instance_id: str) -> None:
        with self._lock:
            self._blocks.pop(instance_id, None)

    def snapshot(self) -> dict[str, dict[int, Tier]]:
        """A copy of every instance's blocks (written back to Redis after it comes back)."""
        with self._lock:
            return {i: dict(blocks) for i, blocks in self._blocks.items()}

    def count_by_tier(self) -> dict[Tier, int]:
        with self._lock:
            counts = {t: 0 for t in Tier}
            for blocks in self._blocks.values():
                for tier in blocks.values():
                    counts[tier] += 1
            return counts
