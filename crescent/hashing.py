"""Prefix-block hashing: the one definition of a KV block's identity, shared by every service.

A prompt is cut into full blocks of ``block_size`` tokens; block i's hash chains block i-1's hash with block i's
token ids, so equal hashes mean equal prefixes (up to 64-bit collisions). The chain is seeded by the model id, so two
models never share a block. Hashes are unsigned 64-bit ints (protobuf ``uint64``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np


def _digest(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def model_seed(model_id: str) -> int:
    """The chain's starting value for ``model_id``."""
    return _digest(b"crescent-model:" + model_id.encode())


def chain_hash(parent: int, block_tokens: Sequence[int]) -> int:
    """Hash of one full block given its parent's hash."""
    tokens = np.asarray(block_tokens, dtype=np.int64).tobytes()
    return _digest(parent.to_bytes(8, "little") + tokens)


def prefix_block_hashes(token_ids: Sequence[int], block_size: int, model_id: str = "") -> list[int]:
    """Hashes of every *full* block of ``token_ids`` (a trailing partial block has none)."""
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    out: list[int] = []
    parent = model_seed(model_id)
    for i in range(len(token_ids) // block_size):
        parent = chain_hash(parent, token_ids[i * block_size : (i + 1) * block_size])
        out.append(parent)
    return out
