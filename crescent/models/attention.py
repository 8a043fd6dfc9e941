"""Attention backends: the one place the model touches the paged KV cache.

llama.py computes q/k/v (after RoPE) and hands them to a backend, so a GPU/Triton backend can replace the torch
one without touching the model. Shapes: paged ``q [T, H, D]``, ``k``/``v`` ``[T, Hkv, D]`` (T new tokens of a
varlen batch, see AttentionContext); dense ``q [B, S, H, D]``, ``k``/``v`` ``[B, S, Hkv, D]``.
"""

from __future__ import annotations

import itertools
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from crescent.kernels import cpu as cpu_ops
from crescent.kernels.moba import moba_attn_prefix, moba_attn_varlen, moba_decode_paged
from crescent.models.attention_context import AttentionContext, SeqSlice
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
class _DecodeIndex:
    """The sequences of a forward that add exactly one token, laid out for one batched decode call."""

    rows: Tensor | None  # [Bd] long: their tokens' rows in the flat batch; None when every token is one
    blocks: Tensor  # [sum of blocks needed] long: every sequence's cache blocks back to back, no padding
    starts: list[int]  # per sequence: where its context begins in the packed [blocks * block_size] gather
    lens: list[int]  # per sequence: its context length
    block_tables: Tensor  # [Bd, max_blocks] int32, 0-padded (MoBA decode)
    context_lens: Tensor  # [Bd] int32


@dataclass
class _PagedIndex:
    """Where each sequence's context lives in the cache; the same for every layer of one forward."""

    tables: list[Tensor]  # per sequence: its block ids (long)
    decode: _DecodeIndex | None  # the one-new-token sequences, if any


class _Scratch:
    """Reused gather buffers for decode (one per name, grown to the largest batch x context seen).

    Each layer's gathered K/V (B x context x Hkv x D, megabytes) is dead once its attention returns; allocating
    them afresh 2x per layer made the allocator hand pages back to the OS and fault them in again, which cost
    ~5x the copy itself here. Not thread-safe: one backend serves one engine loop."""

    def __init__(self) -> None:
        self._bufs: dict[str, Tensor] = {}

    def __call__(self, name: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
        need = math.prod(shape)
        buf = self._bufs.get(name)
        if buf is None or buf.numel() < need or buf.dtype != like.dtype or buf.device != like.device:
            buf = self._bufs[name] = torch.empty(need, dtype=like.dtype, device=like.device)
        return buf[:need].view(shape)


class TorchAttentionBackend(AttentionBackend):
    """CPU-friendly reference backend: SDPA for full layers, the torch MoBA reference for MoBA layers.

    ``cpu_kernels``: full-attention decode on CPU runs crescent.kernels.cpu's paged-decode kernel, which reads
    each context in place from the cache (3-5x the gather + per-sequence SDPA below at 8-32 x 300-860 tokens here);
    the caller checks ``crescent.kernels.cpu.available()`` first."""

    def __init__(self, cpu_kernels: bool = False) -> None:
        self._scratch = _Scratch()
        self.cpu_kernels = cpu_kernels

    def attend(self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor, ctx: AttentionContext,
               spec: AttentionSpec) -> Tensor:
        if not ctx.seqs:
            return torch.empty_like(q)
        if ctx.kv_caches is None:
            return self._attend_uncached(q, k, v, ctx, spec)
        k_cache, v_cache = ctx.kv_caches[layer_idx]
        write_kv(k_cache, v_cache, k, v, ctx.slot_mapping)
        index = _paged_index(ctx, q.device)
        dec = index.decode if _batched_decode(spec, ctx.block_size) else None
        if dec is not None and dec.rows is None:  # a pure decode step: one call for the whole batch
            return self._decode(q, k_cache, v_cache, dec, spec)
        out = torch.empty_like(q)
        if dec is not None:  # a mixed step: the decoding sequences still go in one call
            out.index_copy_(0, dec.rows, self._decode(q.index_select(0, dec.rows), k_cache, v_cache, dec, spec))
        for seq, table in zip(ctx.seqs, index.tables, strict=True):
            if seq.num_new == 0 or (dec is not None and seq.num_new == 1):
                continue
            sl = slice(seq.start, seq.end)
            if seq.prefix_len == 0 and k_cache.dtype == q.dtype:  # a whole prompt: its K/V are the new ones
                out[sl] = _attend_one(q[sl], k[sl], v[sl], spec)
            else:
                keys, values = (_gather_context(c, table, seq.context_len) for c in (k_cache, v_cache))
                out[sl] = _attend_one(q[sl], keys, values, spec)
        return out

    def _decode(self, q: Tensor, k_cache: Tensor, v_cache: Tensor, dec: _DecodeIndex,
                spec: AttentionSpec) -> Tensor:
        if (self.cpu_kernels and spec.kind == "full" and q.device.type == "cpu" and k_cache.dtype == q.dtype
                and k_cache.is_contiguous() and v_cache.is_contiguous()):
            return cpu_ops.paged_decode(q, k_cache, v_cache, dec.block_tables, dec.context_lens)
        return _decode(q, k_cache, v_cache, dec, spec, self._scratch)

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
    tables = [torch.tensor(s.block_table, dtype=torch.long) for s in ctx.seqs]
    decoding = [i for i, s in enumerate(ctx.seqs) if s.num_new == 1]
    dec = None
    if decoding:
        rows = None if len(decoding) == len(ctx.seqs) else torch.tensor([ctx.seqs[i].start for i in decoding])
        dec = _decode_index([ctx.seqs[i] for i in decoding], [tables[i] for i in decoding], rows,
                            ctx.block_size, device)
    index = _PagedIndex([t.to(device) for t in tables], dec)
    ctx.extras[_PAGED_INDEX_KEY] = index
    return index


def _decode_index(seqs: list[SeqSlice], tables: list[Tensor], rows: Tensor | None, block_size: int,
                  device: torch.device) -> _DecodeIndex:
    lens = torch.tensor([s.context_len for s in seqs], dtype=torch.int32)
    if int(lens.min()) < 1:
        raise ValueError(f"decode contexts must hold >= 1 token; got context lengths {lens.tolist()}")
    needed = [-(-s.context_len // block_size) for s in seqs]
    short = [i for i, (s, n) in enumerate(zip(seqs, needed, strict=True)) if len(s.block_table) < n]
    if short:
        s = seqs[short[0]]
        raise ValueError(f"a block table of {len(s.block_table)} blocks cannot hold a context of {s.context_len} "
                         f"tokens at block_size={block_size}")
    width = max(needed)
    packed = torch.cat([t[:n] for t, n in zip(tables, needed, strict=True)])
    starts = [0, *itertools.accumulate(n * block_size for n in needed[:-1])]
    block_tables = torch.zeros(len(seqs), width, dtype=torch.int32)
    for i, (t, n) in enumerate(zip(tables, needed, strict=True)):
        block_tables[i, :n] = t[:n]
    rows = rows.to(device) if rows is not None else None
    return _DecodeIndex(rows, packed.to(device), starts, lens.tolist(), block_tables.to(device), lens.to(device))


def _batched_decode(spec: AttentionSpec, block_size: int) -> bool:
    return spec.kind == "full" or spec.moba_block_size % block_size == 0


def _gather_context(cache: Tensor, table: Tensor, context_len: int) -> Tensor:
    """One sequence's context ``[context_len, Hkv, D]`` (whole blocks gathered, then sliced)."""
    return cache.index_select(0, table).view(-1, *cache.shape[2:])[:context_len]


def _decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, dec: _DecodeIndex, spec: AttentionSpec,
            scratch: _Scratch) -> Tensor:
    """One query per sequence ``q [Bd, H, D]`` -> ``[Bd, H, D]``."""
    if spec.kind == "moba":
        return moba_decode_paged(q, k_cache, v_cache, dec.block_tables, dec.context_lens, spec.moba_block_size,
                                 spec.moba_topk)
    b, h, d = q.shape
    n_kv = k_cache.shape[2]
    kv = []
    for name, cache in (("k", k_cache), ("v", v_cache)):
        # Every sequence's blocks, packed back to back in one index_select: no padding to the longest context,
        # so a batch of mixed lengths gathers (and attends over) only real tokens, and slots past a context's
        # end (stale, even NaN) are sliced off below instead of zeroed and masked.
        gathered = scratch(name, (dec.blocks.numel(), *cache.shape[1:]), cache)
        kv.append(torch.index_select(cache, 0, dec.blocks, out=gathered).view(-1, n_kv, d))
    out = torch.empty_like(q)
    # Each KV head's query group as a short query sequence: GQA without repeating K/V. One SDPA per sequence
    # over its exact context (strided [1, Hkv, L, D] views; measured faster on CPU than copying heads-first;
    # 4-D, as 3-D inputs send CPU SDPA down its much slower math path).
    groups = q.view(b, 1, n_kv, h // n_kv, d)
    for i, (start, length) in enumerate(zip(dec.starts, dec.lens, strict=True)):
        keys, values = (x[start : start + length].transpose(0, 1)[None].to(q.dtype) for x in kv)
        out[i] = F.scaled_dot_product_attention(groups[i], keys, values).view(h, d)
    return out


def _attend_one(q: Tensor, keys: Tensor, values: Tensor, spec: AttentionSpec) -> Tensor:
    """One sequence: q ``[n, H, D]`` are the last n of ``keys``/``values`` ``[L, Hkv, D]``."""
    keys, values = keys.to(q.dtype), values.to(q.dtype)
    if spec.kind == "moba":
        return moba_attn_prefix(q, keys, values, spec.moba_block_size, spec.moba_topk)
    n, total = q.shape[0], keys.shape[0]
    mask = None
    if n != total:  # queries sit at the end of the context: a bottom-right aligned causal mask
        mask = torch.arange(total, device=q.device)[None, :] <= torch.arange(total - n, total, device=q.device)[:, None]
    # 4-D with a batch of one: on CPU, 3-D inputs make SDPA take its math path (materialised scores, K/V repeated
    # for GQA), measured 3.5-5x slower here than the flash kernel that 4-D inputs get.
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], keys.transpose(0, 1)[None],
                                         values.transpose(0, 1)[None], attn_mask=mask, is_causal=mask is None,
                                         enable_gqa=True)
    return out[0].transpose(0, 1)
