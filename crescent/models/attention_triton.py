"""The Triton attention backend (CUDA): MoBA layers run the exact MoBA Triton kernels, full layers SDPA.

Same contract as ``attention.TorchAttentionBackend`` (see attention.py). Triton is imported on first use, not at
import, so importing this module on a CPU machine costs nothing (and leaves the interpreter tests alone).

MoBA decode routes on a centroid pool (one fp32 centroid per full MoBA block, stored at the block's last cache
page; see ``MobaCentroidPool``). The backend keeps it current itself: a page written in this forward loses its
entry, and before a decode step every complete block whose entry is missing is computed from the cache. Pages the
engine fills by other means (KV loaded from the store) must be reported with ``invalidate_pages``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from crescent.models.attention import AttentionBackend, TorchAttentionBackend, write_kv
from crescent.models.attention_context import AttentionContext, SeqSlice
from crescent.models.config import AttentionSpec

_MISSING_KEY = "triton_backend.missing_blocks"
_FORGOT_KEY = "triton_backend.forgot_written_pages"


class TritonAttentionBackend(AttentionBackend):
    """CUDA backend: exact MoBA Triton kernels for MoBA layers, the torch backend (SDPA) for full layers."""

    def __init__(self) -> None:
        self._torch = TorchAttentionBackend()
        self._pool = None  # MobaCentroidPool, built on the first MoBA decode step
        self._valid_pages: set[int] = set()

    def invalidate_pages(self, pages) -> None:
        """Forget the centroids stored at these cache pages (call when their K/V changed outside ``attend``)."""
        self._valid_pages.difference_update(int(p) for p in pages)

    def attend(self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor, ctx: AttentionContext,
               spec: AttentionSpec) -> Tensor:
        if spec.kind != "moba" or not ctx.seqs:
            return self._torch.attend(layer_idx, q, k, v, ctx, spec)
        if ctx.kv_caches is None:
            if any(s.prefix_len for s in ctx.seqs):
                raise ValueError("a forward without kv_caches cannot continue a cached prefix: pass kv_caches")
            return _varlen(q, k, v, [s.num_new for s in ctx.seqs], [s.num_new for s in ctx.seqs], spec)
        k_cache, v_cache = ctx.kv_caches[layer_idx]
        write_kv(k_cache, v_cache, k, v, ctx.slot_mapping)
        self._forget_written_pages(ctx)
        if ctx.is_decode_only and spec.moba_block_size % ctx.block_size == 0:
            return self._decode(layer_idx, q, k_cache, v_cache, ctx, spec)
        slots = torch.cat([_context_slots(s, ctx.block_size, q.device) for s in ctx.seqs])
        keys, values = (c.view(-1, *c.shape[2:])[slots].to(q.dtype) for c in (k_cache, v_cache))
        return _varlen(q, keys, values, [s.num_new for s in ctx.seqs], [s.context_len for s in ctx.seqs], spec)

    def attend_dense(self, q: Tensor, k: Tensor, v: Tensor, spec: AttentionSpec) -> Tensor:
        if spec.kind != "moba":
            return self._torch.attend_dense(q, k, v, spec)
        b, s, h, d = q.shape
        flat = (q.reshape(b * s, h, d), k.reshape(b * s, *k.shape[2:]), v.reshape(b * s, *v.shape[2:]))
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
            # Training: the forward kernels alone would cut the graph here; the trainable path adds their backward.
            out = _varlen_trainable(*flat, b, s, spec)
        else:
            out = _varlen(*flat, [s] * b, [s] * b, spec)
        return out.view(b, s, h, d)

    def _decode(self, layer_idx: int, q: Tensor, k_cache: Tensor, v_cache: Tensor, ctx: AttentionContext,
                spec: AttentionSpec) -> Tensor:
        from crescent.kernels.moba.decode_triton import MobaCentroidPool, moba_decode_paged_triton

        pool = self._pool
        if pool is None or pool.table.shape[1:] != (k_cache.shape[0], *k_cache.shape[2:]) or \
                pool.moba_block_size != spec.moba_block_size or pool.table.shape[0] != len(ctx.kv_caches):
            pool = self._pool = MobaCentroidPool(len(ctx.kv_caches), k_cache.shape[0], k_cache.shape[2],
                                                 k_cache.shape[3], ctx.block_size, spec.moba_block_size, q.device)
            self._valid_pages.clear()
        tables, starts, ends = self._missing_blocks(ctx, spec.moba_block_size)
        if tables:
            pool.update(layer_idx, k_cache, tables, starts, ends)
        width = max(len(s.block_table) for s in ctx.seqs)
        bt = torch.tensor([s.block_table + [0] * (width - len(s.block_table)) for s in ctx.seqs],
                          dtype=torch.int32, device=q.device)
        lens = torch.tensor([s.context_len for s in ctx.seqs], dtype=torch.int32, device=q.device)
        out = moba_decode_paged_triton(q.to(k_cache.dtype), k_cache, v_cache, bt, lens, spec.moba_block_size,
                                       spec.moba_topk, centroids=pool.layer(layer_idx))
        return out.to(q.dtype)

    def _forget_written_pages(self, ctx: AttentionContext) -> None:
        """Once per forward: pages written now hold new K/V, so their centroid entries are stale."""
        if ctx.extras.get(_FORGOT_KEY):
            return
        ctx.extras[_FORGOT_KEY] = True
        if self._valid_pages:
            slots = ctx.slot_mapping
            self._valid_pages.difference_update((slots[slots >= 0] // ctx.block_size).tolist())

    def _missing_blocks(self, ctx: AttentionContext, mb: int):
        """Per forward (shared by all layers): the complete blocks whose centroid entry is missing, as
        (block table, first token, end token) runs for ``MobaCentroidPool.update``."""
        cached = ctx.extras.get(_MISSING_KEY)
        if cached is not None:
            return cached
        ppb = mb // ctx.block_size
        tables, starts, ends = [], [], []
        for s in ctx.seqs:
            for j in range(s.context_len // mb):
                last = s.block_table[(j + 1) * ppb - 1]
                if last not in self._valid_pages:
                    tables.append(s.block_table)
                    starts.append(j * mb)
                    ends.append((j + 1) * mb)
                    self._valid_pages.add(last)
        ctx.extras[_MISSING_KEY] = (tables, starts, ends)
        return tables, starts, ends


def _context_slots(seq: SeqSlice, block_size: int, device: torch.device) -> Tensor:
    pos = torch.arange(seq.context_len)
    table = torch.tensor(seq.block_table, dtype=torch.long)
    return (table[pos // block_size] * block_size + pos % block_size).to(device)


def _varlen(q: Tensor, k: Tensor, v: Tensor, lq: list[int], lk: list[int], spec: AttentionSpec) -> Tensor:
    from crescent.kernels.moba.prefill_triton import moba_attn_varlen_qk_triton

    cu_q = torch.tensor([0, *torch.tensor(lq).cumsum(0).tolist()], dtype=torch.int32, device=q.device)
    cu_k = torch.tensor([0, *torch.tensor(lk).cumsum(0).tolist()], dtype=torch.int32, device=q.device)
    return moba_attn_varlen_qk_triton(q, k.to(q.dtype), v.to(q.dtype), cu_q, cu_k, spec.moba_block_size,
                                      spec.moba_topk, max_seqlen_q=max(lq), max_seqlen_k=max(lk))


def _varlen_trainable(q: Tensor, k: Tensor, v: Tensor, batch: int, seq_len: int, spec: AttentionSpec) -> Tensor:
    from crescent.kernels.moba.autograd import moba_attn_varlen_trainable

    cu = torch.arange(0, (batch + 1) * seq_len, seq_len, dtype=torch.int32, device=q.device)
    return moba_attn_varlen_trainable(q, k.to(q.dtype), v.to(q.dtype), cu, spec.moba_block_size, spec.moba_topk,
                                      max_seqlen=seq_len)
