"""Exact MoBA decode over the paged KV cache in Triton, with a centroid pool the engine keeps.

One new token per sequence (its K/V already written at position ``context_len - 1``). Three launches:
1. route: score the centroids of the sequence's complete MoBA blocks (read from the pool, never from the keys),
   keep the top-(k-1) and the own block;
2. attend: split every selected block into chunks, one program per (sequence, head, chunk), reading pages
   through the block table; each writes a partial output and its log-sum-exp;
3. merge the partials by log-sum-exp.
Bytes read per token: the selected blocks' K/V plus one centroid per complete block, instead of the whole context.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from crescent.kernels.moba.routing_triton import score_precision, topk_merge
from crescent.kernels.moba.triton_common import SUPPORTED_DTYPES, check_routing, next_pow2

LOG2E = 1.4426950408889634


@triton.jit
def _pool_update_kernel(Kc, POOL, pages, dst, stride_kp, stride_ks, stride_kh, stride_pp, stride_ph,
                        P: tl.constexpr, PS: tl.constexpr, PSP: tl.constexpr, D: tl.constexpr):
    """One program per (newly full MoBA block, KV head): fp32 mean of the keys in its P pages."""
    i = tl.program_id(0)
    hk = tl.program_id(1)
    d = tl.arange(0, D)
    r = tl.arange(0, PSP)
    acc = tl.zeros([PSP, D], tl.float32)
    for p in range(P):
        page = tl.load(pages + i * P + p).to(tl.int64)
        ptr = Kc + page * stride_kp + r[:, None] * stride_ks + hk * stride_kh + d[None, :]
        acc += tl.load(ptr, mask=(r < PS)[:, None], other=0.0).to(tl.float32)
    dst_page = tl.load(dst + i).to(tl.int64)
    tl.store(POOL + dst_page * stride_pp + hk * stride_ph + d, tl.sum(acc, 0) / (P * PS))


@triton.jit
def _route_decode_kernel(Q, POOL, BT, CTX, SEL, stride_qb, stride_qh, stride_pp, stride_ph, stride_bt,
                         H: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, MB: tl.constexpr, P: tl.constexpr,
                         K1: tl.constexpr, KP: tl.constexpr, KS: tl.constexpr, CB: tl.constexpr, D: tl.constexpr,
                         PREC: tl.constexpr):
    """One program per (sequence, KV head), its G query heads as the rows of a tile (padded to GP >= 16, so the
    score product is a tensor-core dot): SEL[b, h] = [own block, top-K1 complete earlier blocks, -1...]."""
    b = tl.program_id(0)
    hk = tl.program_id(1)
    own = (tl.load(CTX + b) - 1) // MB
    d = tl.arange(0, D)
    r = tl.arange(0, GP)
    rmask = r < G
    h = hk * G + r
    q = tl.load(Q + b * stride_qb + h[:, None] * stride_qh + d[None, :], mask=rmask[:, None], other=0.0)
    q = q.to(tl.float32)
    best_v = tl.full([GP, KP], float("-inf"), tl.float32)
    best_i = tl.full([GP, KP], -1, tl.int32)
    for n in range(0, own, CB):
        cols = n + tl.arange(0, CB)
        cm = cols < own
        page = tl.load(BT + b * stride_bt + cols * P + (P - 1), mask=cm, other=0).to(tl.int64)
        c = tl.load(POOL + page[:, None] * stride_pp + hk * stride_ph + d[None, :], mask=cm[:, None], other=0.0)
        s = tl.dot(q, tl.trans(c), input_precision=PREC)
        s = tl.where(cm[None, :], s, float("-inf"))
        best_v, best_i = topk_merge(best_v, best_i, s, cols, KP, K1)
    kc = tl.arange(0, KP)
    sel = tl.where(best_v > float("-inf"), best_i, -1)
    base = SEL + (b * H + h) * KS
    tl.store(base[:, None] + 1 + kc[None, :], sel, mask=rmask[:, None] & (kc[None, :] < K1))
    tl.store(base, tl.zeros([GP], tl.int32) + own, mask=rmask)


@triton.jit
def _attend_chunk_kernel(Q, Kc, Vc, BT, CTX, SEL, PO, PL, qk_scale, stride_qb, stride_qh,
                         stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh, stride_bt,
                         H: tl.constexpr, G: tl.constexpr, MB: tl.constexpr, PS: tl.constexpr, KS: tl.constexpr,
                         CPB: tl.constexpr, CHUNK: tl.constexpr, BN: tl.constexpr, D: tl.constexpr):
    """One program per (sequence, head, selected block, chunk of it). Per-lane running softmax statistics keep
    the loop free of cross-lane reductions; lanes merge once at the end."""
    bh = tl.program_id(0)
    sc = tl.program_id(1)
    b = bh // H
    h = bh % H
    j = tl.load(SEL + bh * KS + sc // CPB)
    ctx = tl.load(CTX + b)
    lo = j * MB + (sc % CPB) * CHUNK
    hi = tl.minimum(tl.minimum(lo + CHUNK, (j + 1) * MB), ctx)
    hi = tl.where(j >= 0, hi, lo)
    d = tl.arange(0, D)
    hk = h // G
    q = tl.load(Q + b * stride_qb + h * stride_qh + d).to(tl.float32) * qk_scale
    m_v = tl.full([BN], float("-inf"), tl.float32)
    l_v = tl.zeros([BN], tl.float32)
    acc = tl.zeros([BN, D], tl.float32)
    for n in range(lo, hi, BN):
        pos = n + tl.arange(0, BN)
        pm = pos < hi
        page = tl.load(BT + b * stride_bt + pos // PS, mask=pm, other=0).to(tl.int64)
        slot = pos % PS
        k = tl.load(Kc + page[:, None] * stride_kp + slot[:, None] * stride_ks + hk * stride_kh + d[None, :],
                    mask=pm[:, None], other=0.0).to(tl.float32)
        v = tl.load(Vc + page[:, None] * stride_vp + slot[:, None] * stride_vs + hk * stride_vh + d[None, :],
                    mask=pm[:, None], other=0.0).to(tl.float32)
        s = tl.where(pm, tl.sum(q[None, :] * k, 1), float("-inf"))
        m_new = tl.maximum(m_v, s)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_v - m_safe)
        p = tl.exp2(s - m_safe)
        l_v = l_v * alpha + p
        acc = acc * alpha[:, None] + p[:, None] * v
        m_v = m_new
    m = tl.max(m_v, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(m_v - m_safe)
    l_sum = tl.sum(l_v * w, 0)
    l_safe = tl.where(l_sum > 0, l_sum, 1.0)  # an empty chunk (past the context, or no block) weighs nothing
    out = bh * (KS * CPB) + sc
    tl.store(PO + out * D + d, tl.sum(acc * w[:, None], 0) / l_safe)
    tl.store(PL + out, tl.where(l_sum > 0, m_safe + tl.log2(l_safe), float("-inf")))


@triton.jit
def _merge_kernel(PO, PL, Out, stride_ob, stride_oh, H: tl.constexpr, NS: tl.constexpr, NSP: tl.constexpr,
                  SB: tl.constexpr, D: tl.constexpr):
    """One program per (sequence, head): log-sum-exp merge of its NS chunk partials (the own block is never
    empty), read SB partials at a time to bound registers."""
    bh = tl.program_id(0)
    s = tl.arange(0, NSP)
    d = tl.arange(0, D)
    m = tl.max(tl.load(PL + bh * NS + s, mask=s < NS, other=float("-inf")), 0)
    o = tl.zeros([D], tl.float32)
    w_sum = tl.zeros([SB], tl.float32)
    for s0 in range(0, NS, SB):
        sb = s0 + tl.arange(0, SB)
        w = tl.exp2(tl.load(PL + bh * NS + sb, mask=sb < NS, other=float("-inf")) - m)
        po = tl.load(PO + (bh * NS + sb)[:, None] * D + d[None, :], mask=(sb < NS)[:, None], other=0.0)
        o += tl.sum(po * w[:, None], 0)
        w_sum += w
    o = o / tl.sum(w_sum, 0)
    tl.store(Out + (bh // H) * stride_ob + (bh % H) * stride_oh + d, o.to(Out.dtype.element_ty))


class MobaCentroidPool:
    """fp32 key centroids of full MoBA blocks, per layer, for the paged decode kernel.

    A block's centroid lives at the physical page id of the block's LAST page. With prefix caching a page is shared
    only when every token before it is identical, so that slot is right for every sequence mapping the page, and
    the engine needs no extra bookkeeping: it calls ``update`` after writing K/V, for the blocks that just filled.
    Memory: one [Hkv, D] fp32 row per cache page (1/(page_size/2) of a bf16 K cache).
    """

    def __init__(self, num_layers: int, num_pages: int, n_kv_heads: int, head_dim: int, page_size: int,
                 moba_block_size: int, device: torch.device | str = "cpu"):
        if moba_block_size % page_size:
            raise ValueError(f"moba_block_size={moba_block_size} must be a multiple of the page size {page_size}")
        self.page_size, self.moba_block_size = page_size, moba_block_size
        self.pages_per_block = moba_block_size // page_size
        self.table = torch.zeros(num_layers, num_pages, n_kv_heads, head_dim, dtype=torch.float32, device=device)

    def layer(self, i: int) -> torch.Tensor:
        """[num_pages, Hkv, D] centroids of layer i (what ``moba_decode_paged_triton(centroids=...)`` takes)."""
        return self.table[i]

    def filled_blocks(self, block_tables: Sequence[Sequence[int]], prev_lens: Sequence[int],
                      context_lens: Sequence[int]) -> list[list[int]]:
        """Page lists of the MoBA blocks that became full when each sequence grew from prev_len to context_len."""
        mb, ppb = self.moba_block_size, self.pages_per_block
        out = []
        for table, lo, hi in zip(block_tables, prev_lens, context_lens, strict=True):
            for j in range(lo // mb, hi // mb):
                out.append(list(table[j * ppb : (j + 1) * ppb]))
        return out

    def update(self, layer: int, k_cache: torch.Tensor, block_tables: Sequence[Sequence[int]],
               prev_lens: Sequence[int], context_lens: Sequence[int]) -> int:
        """Store the centroids of layer ``layer``'s newly full blocks; returns how many were written."""
        blocks = self.filled_blocks(block_tables, prev_lens, context_lens)
        if not blocks:
            return 0
        if k_cache.shape[1] != self.page_size:
            raise ValueError(f"k_cache pages hold {k_cache.shape[1]} tokens, the pool was built for {self.page_size}")
        pages = torch.tensor(blocks, dtype=torch.int32, device=k_cache.device)
        pool = self.table[layer]
        _pool_update_kernel[(len(blocks), k_cache.shape[2])](
            k_cache, pool, pages, pages[:, -1].contiguous(), k_cache.stride(0), k_cache.stride(1),
            k_cache.stride(2), pool.stride(0), pool.stride(1), P=self.pages_per_block, PS=self.page_size,
            PSP=next_pow2(self.page_size, floor=1), D=k_cache.shape[3], num_warps=4)
        return len(blocks)


def _check_decode(q, k_cache, v_cache, block_tables, context_lens, moba_block_size, topk) -> None:
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"expected q [B,H,D] and caches [pages,page_size,Hkv,D]; got {tuple(q.shape)}, "
                         f"{tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    if q.dtype not in SUPPORTED_DTYPES or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(f"q and caches must share a dtype among {SUPPORTED_DTYPES}")
    h, d, hkv = q.shape[1], q.shape[2], k_cache.shape[2]
    if k_cache.shape[3] != d or h % hkv or d < 16 or d & (d - 1):
        raise ValueError(f"head_dim {d} must match the cache and be a power of two >= 16; H ({h}) a multiple of Hkv")
    if moba_block_size % k_cache.shape[1]:
        raise ValueError(f"moba_block_size={moba_block_size} is not a multiple of the page size {k_cache.shape[1]}")
    if block_tables.dim() != 2 or block_tables.shape[0] != q.shape[0] or context_lens.shape != (q.shape[0],):
        raise ValueError("block_tables must be [B, max_pages] and context_lens [B]")
    if block_tables.dtype != torch.int32 or context_lens.dtype != torch.int32:
        raise ValueError("block_tables and context_lens must be int32")
    check_routing(moba_block_size, topk)


def moba_decode_paged_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                             block_tables: torch.Tensor, context_lens: torch.Tensor, moba_block_size: int,
                             topk: int, softmax_scale: float | None = None,
                             centroids: torch.Tensor | None = None, chunk: int = 256) -> torch.Tensor:
    """Exact MoBA decode: q [B, H, D]; k_cache/v_cache [pages, page_size, Hkv, D]; block_tables int32
    [B, max_pages]; context_lens int32 [B] (>= 1, the new token's K/V already cached) -> [B, H, D].

    ``centroids`` [pages, Hkv, D] fp32 is a ``MobaCentroidPool.layer(i)``; without it the centroids of every full
    block are computed here first (a host sync and a pass over those keys: fine for tests, not for serving).
    """
    _check_decode(q, k_cache, v_cache, block_tables, context_lens, moba_block_size, topk)
    bsz, h, d = q.shape
    ps, hkv = k_cache.shape[1], k_cache.shape[2]
    if centroids is None:
        pool = MobaCentroidPool(1, k_cache.shape[0], hkv, d, ps, moba_block_size, q.device)
        pool.update(0, k_cache, block_tables.tolist(), [0] * bsz, context_lens.tolist())
        centroids = pool.layer(0)
    o = torch.empty_like(q)
    if bsz == 0:
        return o
    ks = topk  # own block + (topk - 1) routed
    sel = torch.empty(bsz, h, ks, dtype=torch.int32, device=q.device)
    g = h // hkv
    _route_decode_kernel[(bsz, hkv)](
        q, centroids, block_tables, context_lens, sel, q.stride(0), q.stride(1), centroids.stride(0),
        centroids.stride(1), block_tables.stride(0), H=h, G=g, GP=next_pow2(g), MB=moba_block_size,
        P=moba_block_size // ps, K1=ks - 1, KP=max(2, triton.next_power_of_2(max(ks - 1, 1))), KS=ks, CB=64, D=d,
        PREC=score_precision(q), num_warps=4)
    chunk = max(16, min(chunk, moba_block_size))
    cpb = triton.cdiv(moba_block_size, chunk)
    ns = ks * cpb
    po = torch.empty(bsz * h * ns, d, dtype=torch.float32, device=q.device)
    pl = torch.empty(bsz * h * ns, dtype=torch.float32, device=q.device)
    scale = (softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)) * LOG2E
    bn = 32 if d > 64 else 64
    _attend_chunk_kernel[(bsz * h, ns)](
        q, k_cache, v_cache, block_tables, context_lens, sel, po, pl, scale, q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
        v_cache.stride(2), block_tables.stride(0), H=h, G=h // hkv, MB=moba_block_size, PS=ps, KS=ks, CPB=cpb,
        CHUNK=chunk, BN=bn, D=d, num_warps=4)
    _merge_kernel[(bsz * h,)](po, pl, o, o.stride(0), o.stride(1), H=h, NS=ns, NSP=next_pow2(ns, floor=2),
                              SB=16, D=d, num_warps=4)
    return o
