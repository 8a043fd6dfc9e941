"""Attention backends: the one place the model touches the paged KV cache.

llama.py computes q/k/v (after RoPE) and hands them to a backend, so a GPU/Triton backend can replace the torch
one without touching the model. Shapes: paged ``q [T, H, D]``, ``k``/``v`` ``[T, Hkv, D]`` (T new tokens of a
varlen batch, see AttentionContext); dense ``q [B, S, H, D]``, ``k``/``v`` ``[B, S, Hkv, D]``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from crescent.kernels.moba import moba_attn_prefix, moba_attn_varlen, moba_decode_paged
from crescent.models.attention_context import AttentionContext
from crescent.models.config import AttentionSpec

_PAGED_INDEX_KEY = "torch_backend.paged_index"


class AttentionBackend(ABC):
    """Computes one layer's attention for the engine (paged) and for training/oracles (dense)."""

    @abstractmethod
    def attend(self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor, ctx: AttentionContext,
               spec: AttentionSpec) -> Tensor:
        """Store the new tokens' K/V at ``ctx.slot_mapping`` in layer ``layer_idx``'s cache, then attend each
        sequence's queries over its whole context (causal). Returns ``[T, H, D]``."""

    @abstractmethod
    def attend_dense(self, q: Tensor, k: Tensor, v: Tensor, spec: AttentionSpec) -> Tensor:
        """Causal attention with no cache; differentiable. Returns ``[B, S, H, D]``."""


@dataclass
class _PagedIndex:
    """Where each sequence's context lives in the flat cache; the same for every layer of one forward."""

    slots: Tensor  # [B, max_context] long, 0 where past the sequence's end
    valid: Tensor  # [B, max_context] bool
    block_tables: Tensor  # [B, max_blocks] int32
    context_lens: Tensor  # [B] int32


class TorchAttentionBackend(AttentionBackend):
    """CPU-friendly reference backend: SDPA for full layers, the torch MoBA reference for MoBA layers."""

    def attend(self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor, ctx: AttentionContext,
               spec: AttentionSpec) -> Tensor:
        if not ctx.seqs:
            return torch.empty_like(q)
        if ctx.kv_caches is None:
            return self._attend_uncached(q, k, v, ctx, spec)
        k_cache, v_cache = ctx.kv_caches[layer_idx]
        write_kv(k_cache, v_cache, k, v, ctx.slot_mapping)
        index = _paged_index(ctx, q.device)
        if ctx.is_decode_only:
            if spec.kind == "moba" and spec.moba_block_size % ctx.block_size == 0:
                return moba_decode_paged(q, k_cache, v_cache, index.block_tables, index.context_lens,
                                         spec.moba_block_size, spec.moba_topk)
            if spec.kind == "full":
                return _decode_full(q, k_cache, v_cache, index)
        out = torch.empty_like(q)
        for i, seq in enumerate(ctx.seqs):
            if seq.num_new == 0:
                continue
            keys = _gather(k_cache, index.slots[i, : seq.context_len])
            values = _gather(v_cache, index.slots[i, : seq.context_len])
            out[seq.start : seq.end] = _attend_one(q[seq.start : seq.end], keys, values, spec)
        return out

    def attend_dense(self, q: Tensor, k: Tensor, v: Tensor, spec: AttentionSpec) -> Tensor:
        b, s, h, d = q.shape
        if spec.kind == "moba":
            cu = torch.arange(0, (b + 1) * s, s, dtype=torch.int32, device=q.device)
            out = moba_attn_varlen(q.reshape(b * s, h, d), k.reshape(b * s, *k.shape[2:]),
                                   v.reshape(b * s, *v.shape[2:]), cu, spec.moba_block_size, spec.moba_topk)
            return out.view(b, s, h, d)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=True, enable_gqa=True)
        return out.transpose(1, 2)

    def _attend_uncached(self, q: Tensor, k: Tensor, v: Tensor, ctx: AttentionContext,
                         spec: AttentionSpec) -> Tensor:
        out = torch.empty_like(q)
        for seq in ctx.seqs:
            if seq.prefix_len:
                raise ValueError("a forward without kv_caches cannot continue a cached prefix: pass kv_caches")
            sl = slice(seq.start, seq.end)
            out[sl] = _attend_one(q[sl], k[sl], v[sl], spec)
        return out


def write_kv(k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, slot_mapping: Tensor | None) -> None:
    """Scatter the new tokens' K/V into the paged cache; slot -1 means "do not store"."""
    if slot_mapping is None:
        raise ValueError("AttentionContext.slot_mapping is required when kv_caches are given")
    slots = slot_mapping.to(device=k_cache.device, dtype=torch.long)
    keep = slots >= 0
    if not bool(keep.all()):
        slots, k, v = slots[keep], k[keep], v[keep]
    flat_k = k_cache.view(-1, *k_cache.shape[2:])
    flat_v = v_cache.view(-1, *v_cache.shape[2:])
    flat_k.index_copy_(0, slots, k.to(k_cache.dtype))
    flat_v.index_copy_(0, slots, v.to(v_cache.dtype))


def _paged_index(ctx: AttentionContext, device: torch.device) -> _PagedIndex:
    cached = ctx.extras.get(_PAGED_INDEX_KEY)
    if cached is not None:
        return cached
    max_blocks = max(len(s.block_table) for s in ctx.seqs)
    tables = torch.zeros(len(ctx.seqs), max(max_blocks, 1), dtype=torch.int32)
    for i, seq in enumerate(ctx.seqs):
        tables[i, : len(seq.block_table)] = torch.tensor(seq.block_table, dtype=torch.int32)
    lens = torch.tensor([s.context_len for s in ctx.seqs], dtype=torch.int32)
    pos = torch.arange(int(lens.max()))
    slots = tables.long()[:, pos // ctx.block_size] * ctx.block_size + pos % ctx.block_size
    valid = pos[None, :] < lens[:, None]
    index = _PagedIndex(torch.where(valid, slots, 0).to(device), valid.to(device), tables.to(device),
                        lens.to(device))
    ctx.extras[_PAGED_INDEX_KEY] = index
    return index


def _gather(cache: Tensor, slots: Tensor) -> Tensor:
    return cache.view(-1, *cache.shape[2:])[slots]


def _decode_full(q: Tensor, k_cache: Tensor, v_cache: Tensor, index: _PagedIndex) -> Tensor:
    """One query per sequence, all sequences in one padded SDPA call."""
    keep = index.valid[:, :, None, None]
    zero = torch.zeros((), dtype=k_cache.dtype, device=k_cache.device)
    # where(), not a mask alone: padding slots may hold stale or NaN data that a masked SDPA would still multiply.
    keys = torch.where(keep, _gather(k_cache, index.slots), zero).to(q.dtype)
    values = torch.where(keep, _gather(v_cache, index.slots), zero).to(q.dtype)
    out = F.scaled_dot_product_attention(q[:, :, None], keys.transpose(1, 2), values.transpose(1, 2),
                                         attn_mask=index.valid[:, None, None, :], enable_gqa=True)
    return out[:, :, 0]


def _attend_one(q: Tensor, keys: Tensor, values: Tensor, spec: AttentionSpec) -> Tensor:
    """One sequence: q ``[n, H, D]`` are the last n of ``keys``/``values`` ``[L, Hkv, D]``."""
    keys, values = keys.to(q.dtype), values.to(q.dtype)
    if spec.kind == "moba":
        return moba_attn_prefix(q, keys, values, spec.moba_block_size, spec.moba_topk)
    n, total = q.shape[0], keys.shape[0]
    mask = None
    if n != total:  # queries sit at the end of the context: a bottom-right aligned causal mask
        mask = torch.arange(total, device=q.device)[None, :] <= torch.arange(total - n, total, device=q.device)[:, None]
    out = F.scaled_dot_product_attention(q.transpose(0, 1), keys.transpose(0, 1), values.transpose(0, 1),
                                         attn_mask=mask, is_causal=mask is None, enable_gqa=True)
    return out.transpose(0, 1)
