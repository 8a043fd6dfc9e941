"""Paged KV blocks: block tables, reference counts and a prefix cache keyed by the cluster's chained block hash.

A block is *in use* (ref > 0), *cached-free* (ref 0 but still holding a hashed full block, kept for reuse and
recycled least-recently-freed first) or *empty*. New blocks come from the empty list first, then from the cached-free
LRU, so a reusable prefix survives as long as possible. This module only tracks ids; the tensors live in the model
runner. Hashes are ``chain_hash`` seeded by ``model_seed(model_id)``, so they equal the conductor's and the store's.
"""

from __future__ import annotations

from collections import OrderedDict, deque

from crescent.engine.sequence import Sequence
from crescent.hashing import chain_hash, model_seed


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, model_id: str = "", enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.seed = model_seed(model_id)
        self.ref_count = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.hash_to_block: dict[int, int] = {}
        self.empty: deque[int] = deque(range(num_blocks))
        self.cached_free: OrderedDict[int, None] = OrderedDict()  # insertion order = LRU order

    # --- accounting -------------------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self.empty) + len(self.cached_free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def hashes(self, seq: Sequence, num_blocks: int) -> list[int]:
        """Extend ``seq.block_hashes`` to cover its first ``num_blocks`` full blocks and return them."""
        bs = self.block_size
        while len(seq.block_hashes) < num_blocks:
            i = len(seq.block_hashes)
            parent = seq.block_hashes[-1] if seq.block_hashes else self.seed
            seq.block_hashes.append(chain_hash(parent, seq.token_ids[i * bs:(i + 1) * bs]))
        return seq.block_hashes[:num_blocks]

    # --- prefix cache -----------------------------------------------------------------------------------------
    def lookup(self, seq: Sequence) -> list[int]:
        """Cached blocks holding a prefix of ``seq`` (not taken yet). At least one token is always left to compute,
        because the engine needs the last position's logits."""
        if not self.enable_prefix_caching:
            return []
        hits: list[int] = []
        for h in self.hashes(seq, (seq.num_tokens - 1) // self.block_size):
            block = self.hash_to_block.get(h)
            if block is None:
                break
            hits.append(block)
        return hits

    def cached_prefix_blocks(self, hashes: list[int]) -> int:
        """How many leading ``hashes`` are in the cache."""
        n = 0
        for h in hashes:
            if h not in self.hash_to_block:
                break
            n += 1
        return n

    def can_admit(self, hits: list[int], num_total_tokens: int) -> bool:
        """Whether ``seq`` can take ``hits`` and grow to ``num_total_tokens`` tokens of blocks."""
        revived = sum(1 for b in hits if self.ref_count[b] == 0)  # taking them removes them from the free pool
        return self.blocks_for(num_total_tokens) - len(hits) <= self.num_free - revived

    def take(self, seq: Sequence, hits: list[int]) -> None:
        """Make the cached ``hits`` the start of ``seq``'s (empty) block table."""
        assert not seq.block_table, "take() is for a sequence without blocks"
        for b in hits:
            if self.ref_count[b] == 0:
                del self.cached_free[b]
            self.ref_count[b] += 1
        seq.block_table = list(hits)
        seq.num_computed = len(hits) * self.block_size
        seq.num_committed_blocks = len(hits)

    # --- allocation -------------------------------------------------------------------------------------------
    def _pop_free(self) -> int:
        if self.empty:
            return self.empty.popleft()
        block, _ = self.cached_free.popitem(last=False)  # evict the least recently freed cached block
        h = self.block_hash[block]
        if h is not None and self.hash_to_block.get(h) == block:
            del self.hash_to_block[h]
        self.block_hash[block] = None
        return block

    def grow(self, seq: Sequence, num_total_tokens: int) -> bool:
        """Give ``seq`` blocks for ``num_total_tokens`` tokens; False (and no change) when too few are free."""
        need = self.blocks_for(num_total_tokens) - len(seq.block_table)
        if need > self.num_free:
            return False
        for _ in range(need):
            block = self._pop_free()
            self.ref_count[block] = 1
            seq.block_table.append(block)
        return True

    def free(self, seq: Sequence) -> None:
        """Drop ``seq``'s references. Its tail is released first so that, under pressure, the shared head of a
        prompt is the last to be evicted."""
        for block in reversed(seq.block_table):
            self._unref(block)
        seq.block_table = []
        seq.num_committed_blocks = 0

    def _unref(self, block: int) -> None:
        self.ref_count[block] -= 1
        assert self.ref_count[block] >= 0, f"block {block} freed twice"
        if self.ref_count[block] == 0:
            if self.block_hash[block] is not None:
                self.cached_free[block] = None
            else:
                self.empty.append(block)

    def commit(self, seq: Sequence) -> None:
        """Offer ``seq``'s newly completed full blocks (KV computed) to the prefix cache."""
        if not self.enable_prefix_caching:
            return
        full = min(seq.num_computed // self.block_size, len(seq.block_table))
        if full <= seq.num_committed_blocks:
            return
        hashes = self.hashes(seq, full)
        for i in range(seq.num_committed_blocks, full):
            block, h = seq.block_table[i], hashes[i]
            if h not in self.hash_to_block and self.block_hash[block] is None:
                self.hash_to_block[h] = block
                self.block_hash[block] = h
        seq.num_committed_blocks = full

    # --- disaggregation ---------------------------------------------------------------------------------------
    def blocks_of(self, hashes: list[int]) -> list[int | None]:
        return [self.hash_to_block.get(h) for h in hashes]

    def reserve_imports(self, hashes: list[int]) -> list[tuple[int, int]]:
        """Claim a block for each of ``hashes`` not already cached, as cached-free blocks (ref 0), in order.
        Stops when the free pool is used up rather than evict the blocks this very import just added."""
        if not self.enable_prefix_caching:
            return []
        budget = self.num_free
        out: list[tuple[int, int]] = []
        for h in hashes:
            if h in self.hash_to_block:
                self._touch(self.hash_to_block[h])
                continue
            if len(out) >= budget:
                break
            block = self._pop_free()
            self.block_hash[block] = h
            self.hash_to_block[h] = block
            self.cached_free[block] = None
            out.append((h, block))
        return out

    def _touch(self, block: int) -> None:
        if block in self.cached_free:
            self.cached_free.move_to_end(block)
