"""A stored KV block's identity, its record, its checksum and the KV events the store emits.

A block is content-addressed: ``BlockKey(model_id, block_hash, layer_start, layer_end)`` where ``block_hash``
is the chained prefix hash of :func:`crescent.hashing.prefix_block_hashes`. The value is
opaque bytes (a worker's ``[num_layers, 2, block_size, n_kv_heads, head_dim]`` tensor); beside it a block may
carry small opaque metadata (e.g. MoBA key centroids per layer and KV head), stored, checksummed, moved and
served with the block.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import NamedTuple

import crc32c

MAX_MODEL_ID_BYTES = 512
MAX_META_BYTES = 1 << 20  # metadata is for centroids and the like; anything bigger belongs in the block


class Tier(enum.IntEnum):
    """Same numbers as ``crescent.v1.Tier`` so they go on the wire unchanged."""

    NONE = 0
    DRAM = 2
    SSD = 3

    @property
    def label(self) -> str:
        return self.name.lower()


class BlockKey(NamedTuple):
    """A tuple, not a dataclass: the store hashes and compares keys several times per block, and a tuple's
    hash, equality and construction (``BlockKey._make``) run in C."""

    model_id: str
    block_hash: int
    layer_start: int
    layer_end: int  # exclusive

    def validate(self) -> None:
        if not 0 <= self.block_hash < 1 << 64:
            raise ValueError(f"block_hash {self.block_hash} is not a uint64")
        if not 0 <= self.layer_start < self.layer_end < 1 << 32:
            raise ValueError(f"bad layer range [{self.layer_start}, {self.layer_end}): need 0 <= start < end")
        if len(self.model_id.encode()) > MAX_MODEL_ID_BYTES:
            raise ValueError(f"model_id longer than {MAX_MODEL_ID_BYTES} bytes")


def crc_update(data, value: int = 0) -> int:
    """CRC-32C (Castagnoli) of ``data`` continuing from ``value``: hardware-accelerated (SSE4.2/ARMv8), about
    3x zlib's crc32 here, and it releases the GIL on large buffers, so checksums overlap socket and disk
    I/O."""
    return crc32c.crc32c(data, value)


def checksum(data, meta: bytes = b"") -> int:
    """The block's checksum: CRC-32C of its metadata, then of its bytes."""
    return crc_update(data, crc_update(meta)) if meta else crc_update(data)


@dataclass(eq=False, slots=True)
class BlockRecord:
    """Where one block lives now. Mutated only under the store's lock."""

    key: BlockKey
    size: int
    crc: int
    meta: bytes = b""
    tier: Tier = Tier.NONE
    slot: int = -1        # DRAM arena slot, when tier is DRAM
    pins: int = 0         # readers holding a lease; a pinned block is never evicted or moved


class EventKind(enum.IntEnum):
    """Same numbers as ``crescent.v1.KvEvent.Kind``."""

    STORED = 1
    EVICTED = 2
    MOVED = 3


@dataclass
class KvEvent:
    kind: EventKind
    model_id: str
    block_hashes: list[int] = field(default_factory=list)
    tier: Tier = Tier.NONE       # where the blocks are now (STORED, MOVED) or were (EVICTED)
    from_tier: Tier = Tier.NONE  # MOVED: where they were


class StoreFullError(RuntimeError):
    """Every DRAM slot is pinned by an in-flight transfer; retry later."""


@dataclass(eq=False, slots=True)
class Lease:
    """A pinned block (checksum-verified unless acquired with ``verify=False``); ``view`` stays valid until
    :meth:`BlockStore.release`."""

    record: BlockRecord
    view: memoryview
    verified: bool = False

    @property
    def meta(self) -> bytes:
        return self.record.meta


@dataclass(eq=False, slots=True)
class Reservation:
    """A DRAM slot being filled by a put; invisible to readers until :meth:`BlockStore.commit`."""

    record: BlockRecord
    view: memoryview
