"""The DRAM arena: fixed slots, prefaulted zeroed memory, and huge pages for the SSD tier's O_DIRECT reads."""

from __future__ import annotations

from pathlib import Path

import pytest

from crescent.services.kvstore.dram import DramArena

MIB = 1 << 20
THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _anon_huge_kib(address: int) -> int:
    """AnonHugePages of the mapping that holds ``address``, from /proc/self/smaps."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:
            start, end = (int(x, 16) for x in head.split("-"))
            inside = start <= address < end
        elif inside and head == "AnonHugePages:":
            return int(line.split()[1])
    raise AssertionError(f"no mapping holds {address:#x}")


def test_slots_are_disjoint_and_prefaulted_memory_is_zero():
    arena = DramArena(4 * MIB + 5, MIB, prefault=True)
    assert arena.num_slots == 4 and arena.capacity_bytes == 4 * MIB
    assert not arena.buffer.any()
    slots = [arena.allocate() for _ in range(4)]
    assert sorted(slots) == [0, 1, 2, 3] and arena.allocate() is None
    for slot in slots:
        arena.view(slot, MIB)[:] = bytes([slot + 1]) * MIB
    assert [arena.buffer[s * MIB : (s + 1) * MIB].min() for s in range(4)] == [1, 2, 3, 4]
    assert arena.address(3) - arena.address(0) == 3 * MIB and arena.address(0) % 4096 == 0
    arena.release(slots[0])
    assert arena.allocate() == slots[0]


@pytest.mark.skipif(
    not THP.exists() or "[never]" in THP.read_text(), reason="no transparent huge pages on this kernel"
)
def test_prefaulted_arena_is_backed_by_huge_pages():
    # 16 MiB holds at least six aligned 2 MiB ranges wherever the kernel places the mapping
    arena = DramArena(16 * MIB, MIB, prefault=True)
    assert _anon_huge_kib(arena.base_address) >= 2048
