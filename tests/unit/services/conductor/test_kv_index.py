from __future__ import annotations

import pytest

from crescent.services.conductor.cluster import Tier
from crescent.services.conductor.kv_index import KvEventKind, KvIndex


def test_longest_prefix_stops_at_the_first_missing_block():
    idx = KvIndex()
    idx.apply("p0", KvEventKind.STORED, [1, 2, 3, 5], Tier.DEVICE)
    assert idx.longest_prefix("p0", [1, 2, 3, 4, 5]) == 3
    assert idx.longest_prefix("p0", [2, 3]) == 2
    assert idx.longest_prefix("p1", [1, 2]) == 0
    assert idx.longest_prefix("p0", []) == 0


def test_store_tiers_move_and_evict():
    idx = KvIndex()
    idx.apply("s", KvEventKind.STORED, [1, 2, 3], Tier.DRAM)
    idx.apply("s", KvEventKind.MOVED, [2, 3], Tier.SSD, from_tier=Tier.DRAM)  # demoted
    assert idx.prefix_tiers("s", [1, 2, 3]) == [Tier.DRAM, Tier.SSD, Tier.SSD]
    idx.apply("s", KvEventKind.EVICTED, [3], Tier.DRAM)  # stale: 3 is on SSD now, so it stays
    assert idx.longest_prefix("s", [1, 2, 3]) == 3
    idx.apply("s", KvEventKind.EVICTED, [2], Tier.SSD)
    assert idx.prefix_tiers("s", [1, 2, 3]) == [Tier.DRAM]
    assert idx.count_by_tier() == {Tier.DEVICE: 0, Tier.DRAM: 1, Tier.SSD: 1}


def test_drop_instance_forgets_its_blocks():
    idx = KvIndex()
    idx.apply("p0", KvEventKind.STORED, [1], Tier.DEVICE)
    idx.drop_instance("p0")
    assert idx.longest_prefix("p0", [1]) == 0


def test_unknown_kind_is_an_error():
    with pytest.raises(ValueError, match="unknown KV event kind"):
        KvIndex().apply("p0", 9, [1], Tier.DEVICE)  # type: ignore[arg-type]
