"""What one forward pass of the engine tells every attention layer (the engine <-> model contract).

The engine flattens a batch of sequences into T tokens ("varlen"): sequence i owns tokens
``[seqs[i].start, seqs[i].end)`` of ``input_ids``/``positions``. Every layer writes the new tokens' K/V into the
paged cache at ``slot_mapping`` and then attends each sequence's new queries over that sequence's whole context
(cached prefix + the new tokens), read back through its block table.

Paged cache layout, per layer: ``k_cache`` and ``v_cache`` of shape ``[num_blocks, block_size, n_kv_heads, head_dim]``.
Slot ``s`` is ``(s // block_size, s % block_size)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SeqSlice:
    """One sequence of the batch."""

    start: int
    """First of this sequence's new tokens in the flat batch."""
    end: int
    """One past its last new token."""
    context_len: int
    """Tokens of context after this step (cached prefix + new tokens); the new tokens are the last ``end - start``."""
    block_table: list[int]
    """Cache block ids holding this sequence's tokens, in order (covers ``context_len`` tokens)."""

    @property
    def num_new(self) -> int:
        return self.end - self.start

    @property
    def prefix_len(self) -> int:
        """Tokens already in the cache before this step."""
        return self.context_len - self.num_new


@dataclass
class AttentionContext:
    """Per-forward attention inputs. ``kv_caches`` is None for a dense, cache-free forward (training, oracles)."""

    seqs: list[SeqSlice]
    slot_mapping: torch.Tensor | None = None
    """[T] int64: flat cache slot for each new token's K/V; -1 means do not store."""
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    """Per layer (k_cache, v_cache), each [num_blocks, block_size, n_kv_heads, head_dim]."""
    block_size: int = 16
    extras: dict = field(default_factory=dict)
    """Backend-specific state (e.g. a MoBA centroid pool for the GPU decode kernel)."""

    @property
    def is_decode_only(self) -> bool:
        return all(s.num_new == 1 for s in self.seqs)
