"""Exact MoBA prefill (varlen, causal, GQA) in Triton.

Plan, as in MoBA's efficient version but with exact per-token routing:
1. centroids of complete key blocks, then each (query, head)'s top-(k-1) earlier blocks (routing_triton);
2. the (query, head, slot) pairs are grouped by (key block, KV head): one sort on the GPU. Each group's queries are
   gathered into tiles and attend to that whole block (no mask: a routed block lies strictly in the past), writing a
   partial output and its log-sum-exp per pair;
3. one kernel computes each query's own block causally and merges the partials by log-sum-exp.
Every (query, selected block) pair is computed once, so work tracks the ideal routed-key count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from crescent.kernels.moba.routing_triton import block_centroids, route_prefill
from crescent.kernels.moba.triton_common import check_qkv, check_routing, upcast_tiles

LOG2E = 1.4426950408889634


@triton.jit
def _history_kernel(Q, K, V, PO, PL, perm, tile_grp, tile_row0, grp_end, blk_tok, qk_scale,
                    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, NG,
                    H: tl.constexpr, HKV: tl.constexpr, K1: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                    BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, UPCAST: tl.constexpr):
    """One program per tile of queries routed to one (key block, KV head): attend the whole block."""
    tid = tl.program_id(0)
    g = tl.load(tile_grp + tid)
    if g >= NG:
        return
    rows = tl.load(tile_row0 + tid) + tl.arange(0, BM)
    rmask = rows < tl.load(grp_end + g)
    f = tl.load(perm + rows, mask=rmask, other=0).to(tl.int64)  # flat pair index (t * H + h) * K1 + slot
    t = f // (H * K1)
    h = (f // K1) % H
    d = tl.arange(0, D)
    q = tl.load(Q + t[:, None] * stride_qt + h[:, None] * stride_qh + d[None, :], mask=rmask[:, None], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    k0 = tl.load(blk_tok + g // HKV).to(tl.int64)
    hk = g % HKV
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, D], tl.float32)
    for n in range(0, BLOCK_SIZE, BN):
        cols = n + tl.arange(0, BN)
        cmask = cols < BLOCK_SIZE
        k = tl.load(K + (k0 + cols)[:, None] * stride_kt + hk * stride_kh + d[None, :], mask=cmask[:, None], other=0.0)
        v = tl.load(V + (k0 + cols)[:, None] * stride_vt + hk * stride_vh + d[None, :], mask=cmask[:, None], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k)) * qk_scale
        s = tl.where(cmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    tl.store(PO + f[:, None] * D + d[None, :], (acc / l_i[:, None]).to(PO.dtype.element_ty), mask=rmask[:, None])
    tl.store(PL + f, m_i + tl.log2(l_i), mask=rmask)


@triton.jit
def _own_merge_kernel(Q, K, V, Out, SEL, PO, PL, LSE, cu_q, cu_k, qk_scale,
                      stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
                      G: tl.constexpr, H: tl.constexpr, K1: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                      BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, UPCAST: tl.constexpr,
                      STORE_LSE: tl.constexpr):
    """One program per (query tile, sequence, head): causal attention in the own block, then LSE-merge the
    history partials of every selected block. With STORE_LSE, the merged log2-sum-exp2 of the scaled scores
    goes to LSE [Tq, H] fp32 (what the backward recomputes probabilities from)."""
    pid_m = tl.program_id(0)
    i = tl.program_id(1)
    h = tl.program_id(2)
    q0 = tl.load(cu_q + i)
    lq = tl.load(cu_q + i + 1) - q0
    k0 = tl.load(cu_k + i).to(tl.int64)
    lk = tl.load(cu_k + i + 1) - k0
    m0 = pid_m * BM
    if m0 >= lq:
        return
    off = lk - lq
    rows = m0 + tl.arange(0, BM)
    rmask = rows < lq
    pos = off + rows
    own_start = (pos // BLOCK_SIZE) * BLOCK_SIZE
    trow = (q0 + rows).to(tl.int64)
    d = tl.arange(0, D)
    q = tl.load(Q + trow[:, None] * stride_qt + h * stride_qh + d[None, :], mask=rmask[:, None], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    hk = h // G
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, D], tl.float32)
    kv_lo = ((off + m0) // BLOCK_SIZE) * BLOCK_SIZE
    kv_hi = off + tl.minimum(m0 + BM, lq)
    # Key chunks that every row of the tile sees whole (one own block, all before the first query) skip the mask.
    last_start = ((kv_hi - 1) // BLOCK_SIZE) * BLOCK_SIZE
    full_hi = tl.where(last_start == kv_lo, kv_lo + ((off + m0 - kv_lo) // BN) * BN, kv_lo)
    for n in range(kv_lo, full_hi, BN):
        cols = n + tl.arange(0, BN)
        k = tl.load(K + (k0 + cols)[:, None] * stride_kt + hk * stride_kh + d[None, :])
        v = tl.load(V + (k0 + cols)[:, None] * stride_vt + hk * stride_vh + d[None, :])
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k)) * qk_scale
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    for n in range(full_hi, kv_hi, BN):
        cols = n + tl.arange(0, BN)
        cmask = cols < kv_hi
        k = tl.load(K + (k0 + cols)[:, None] * stride_kt + hk * stride_kh + d[None, :], mask=cmask[:, None], other=0.0)
        v = tl.load(V + (k0 + cols)[:, None] * stride_vt + hk * stride_vh + d[None, :], mask=cmask[:, None], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k)) * qk_scale
        keep = (cols[None, :] >= own_start[:, None]) & (cols[None, :] <= pos[:, None]) & cmask[None, :]
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # padding rows see no key
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    o = acc / l_safe[:, None]
    lse = tl.where(l_i > 0, m_i + tl.log2(l_safe), float("-inf"))
    for slot in range(K1):
        fl = (trow * H + h) * K1 + slot
        valid = rmask & (tl.load(SEL + fl, mask=rmask, other=-1) >= 0)
        lp = tl.load(PL + fl, mask=valid, other=float("-inf"))
        op = tl.load(PO + fl[:, None] * D + d[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
        m_new = tl.maximum(lse, lp)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        w_own = tl.exp2(lse - m_safe)
        w_p = tl.exp2(lp - m_safe)
        w_sum = tl.where(w_own + w_p > 0, w_own + w_p, 1.0)
        o = (o * w_own[:, None] + op * w_p[:, None]) / w_sum[:, None]
        lse = m_safe + tl.log2(w_sum)
    tl.store(Out + trow[:, None] * stride_ot + h * stride_oh + d[None, :], o.to(Out.dtype.element_ty), mask=rmask[:, None])
    if STORE_LSE:
        tl.store(LSE + trow * H + h, lse, mask=rmask)


@dataclass
class VarlenPlan:
    """Batch layout, all on the device: per sequence query/key offsets and complete key blocks."""

    cu_q: torch.Tensor
    cu_k: torch.Tensor
    cu_nb: torch.Tensor  # [B+1] offsets of each sequence's complete blocks in the centroid table
    nb_cap: int  # centroid table rows (>= complete blocks in the batch)
    max_lq: int
    max_lk: int


def make_plan(cu_q: torch.Tensor, cu_k: torch.Tensor, block_size: int, tq: int, tk: int,
              max_seqlen_q: int | None = None, max_seqlen_k: int | None = None) -> VarlenPlan:
    """Without max_seqlen_q/k, cu_seqlens are read back once and checked (a host sync); with them, nothing is."""
    if cu_q.dim() != 1 or cu_q.shape != cu_k.shape or cu_q.numel() < 2:
        raise ValueError("cu_seqlens must be int32 [B+1], the same B for queries and keys")
    if max_seqlen_q is None or max_seqlen_k is None:
        cq, ck = cu_q.tolist(), cu_k.tolist()
        if cq[0] != 0 or ck[0] != 0 or cq[-1] != tq or ck[-1] != tk:
            raise ValueError(f"cu_seqlens must run from 0 to the token counts {tq}/{tk}, got {cq} / {ck}")
        lq = [b - a for a, b in zip(cq, cq[1:], strict=False)]
        lk = [b - a for a, b in zip(ck, ck[1:], strict=False)]
        if any(x < 0 for x in lq) or any(a > b for a, b in zip(lq, lk, strict=True)):
            raise ValueError("cu_seqlens must be non-decreasing, each sequence with at least as many keys as queries")
        max_seqlen_q, max_seqlen_k = max(lq), max(lk)
    cu_q, cu_k = cu_q.to(torch.int32), cu_k.to(torch.int32)
    nb = torch.cumsum((cu_k[1:] - cu_k[:-1]) // block_size, 0)
    cu_nb = torch.cat([torch.zeros(1, dtype=nb.dtype, device=nb.device), nb]).to(torch.int32)
    return VarlenPlan(cu_q, cu_k, cu_nb, tk // block_size, max_seqlen_q, max_seqlen_k)


def _history_schedule(sel: torch.Tensor, nb_cap: int, hkv: int, bm: int, stable: bool = False):
    """Group the valid (query, head, slot) pairs by (key block, KV head) and cut each group into tiles of bm.
    All device ops: the tile count is bounded above on the host and surplus programs exit at once.
    ``stable`` keeps each group's pairs in token order (the backward sums over them: a fixed order makes its
    dK/dV bit-reproducible)."""
    tq, h, _ = sel.shape
    ng = nb_cap * hkv
    hk = (torch.arange(h, device=sel.device, dtype=torch.int32) // (h // hkv)).view(1, h, 1)
    key = torch.where(sel >= 0, sel * hkv + hk, ng).view(-1)
    sorted_key, perm = torch.sort(key, stable=stable)
    perm = perm.to(torch.int32)
    # Group bounds by binary search in the sorted keys (bincount would read its max back to the host).
    gid = torch.arange(ng, device=sel.device, dtype=torch.int32)
    grp_end = torch.searchsorted(sorted_key, gid, right=True)
    counts = grp_end - torch.searchsorted(sorted_key, gid, right=False)
    tiles = (counts + bm - 1) // bm
    tile_end = torch.cumsum(tiles, 0)
    n_tiles_ub = triton.cdiv(key.numel(), bm) + min(ng, key.numel())
    tid = torch.arange(n_tiles_ub, device=sel.device)
    grp = torch.searchsorted(tile_end, tid, right=True)
    gc = grp.clamp(max=max(ng - 1, 0))
    row0 = grp_end[gc] - counts[gc] + (tid - (tile_end[gc] - tiles[gc])) * bm
    return perm, grp.to(torch.int32), row0.to(torch.int32), grp_end.to(torch.int32), ng, n_tiles_ub


def _tiles(q: torch.Tensor) -> dict:
    if upcast_tiles(q):  # interpreter: shapes in tests are tiny
        return dict(route_bm=32, hist_bm=16, hist_bn=32, own_bm=32, own_bn=32, warps=4, stages=1)
    return dict(route_bm=64, hist_bm=64, hist_bn=64, own_bm=64, own_bn=64, warps=4, stages=3)


def moba_attn_varlen_qk_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                               cu_seqlens_k: torch.Tensor, block_size: int, topk: int,
                               softmax_scale: float | None = None, max_seqlen_q: int | None = None,
                               max_seqlen_k: int | None = None, tiles: dict | None = None) -> torch.Tensor:
    """Exact MoBA attention for a varlen batch whose queries are the LAST tokens of each sequence's keys.

    q [Tq, H, D]; k, v [Tk, Hkv, D]; cu_seqlens_q/k int32 [B+1]. Sequence i's queries sit at key positions
    ``lk_i - lq_i ..lk_i - 1`` (a prefill chunk over a cached prefix). Returns [Tq, H, D] in q's dtype.
    Pass max_seqlen_q/k (as FlashAttention does) to skip reading cu_seqlens back to the host.
    """
    h, hkv, d = check_qkv(q, k, v, 3)
    check_routing(block_size, topk)
    plan = make_plan(cu_seqlens_q, cu_seqlens_k, block_size, q.shape[0], k.shape[0], max_seqlen_q, max_seqlen_k)
    return varlen_forward(q, k, v, plan, block_size, topk, softmax_scale, tiles).out


@dataclass
class ForwardState:
    """What one forward leaves for a backward: the output, the routing it used and the row log-sum-exp."""

    out: torch.Tensor  # [Tq, H, D], q's dtype
    sel: torch.Tensor  # [Tq, H, topk-1] int32: selected blocks as centroid-table rows, -1 = none
    blk_tok: torch.Tensor  # [nb_cap] int32: the flat key row each centroid-table block starts at
    lse: torch.Tensor | None  # [Tq, H] fp32 merged log2-sum-exp2 of the scaled scores (when asked for)


def varlen_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: VarlenPlan, block_size: int,
                   topk: int, softmax_scale: float | None = None, tiles: dict | None = None,
                   store_lse: bool = False) -> ForwardState:
    """The launcher behind moba_attn_varlen_qk_triton (inputs already checked); ``store_lse`` also keeps the
    row log-sum-exp, the one extra a FlashAttention-style backward needs."""
    h, hkv, d = q.shape[1], k.shape[1], q.shape[2]
    t = {**_tiles(q), **(tiles or {})}
    scale = (softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)) * LOG2E
    upcast, k1 = upcast_tiles(q), topk - 1
    o = torch.empty_like(q)
    lse = torch.empty(q.shape[0], h, dtype=torch.float32, device=q.device) if store_lse else None
    if q.shape[0] == 0 or plan.max_lq == 0:
        empty_sel = torch.full((q.shape[0], h, k1), -1, dtype=torch.int32, device=q.device)
        return ForwardState(o, empty_sel, torch.empty(0, dtype=torch.int32, device=q.device), lse)
    cen, blk_tok = block_centroids(k, plan.cu_k, plan.cu_nb, plan.nb_cap, plan.max_lk, block_size)
    sel = route_prefill(q, cen, plan.cu_q, plan.cu_k, plan.cu_nb, plan.max_lq, block_size, topk, t["route_bm"],
                        max_blocks=plan.max_lk // block_size)
    # Partials in q's dtype: one extra rounding at bf16/fp16, half the bytes of the merge pass.
    po = torch.empty(q.shape[0] * h * k1, d, dtype=q.dtype, device=q.device)
    pl = torch.empty(q.shape[0] * h * k1, dtype=torch.float32, device=q.device)
    if k1 > 0 and plan.nb_cap > 0:
        perm, grp, row0, grp_end, ng, n_tiles = _history_schedule(sel, plan.nb_cap, hkv, t["hist_bm"])
        _history_kernel[(n_tiles,)](
            q, k, v, po, pl, perm, grp, row0, grp_end, blk_tok, scale, q.stride(0), q.stride(1),
            k.stride(0), k.stride(1), v.stride(0), v.stride(1), ng, H=h, HKV=hkv, K1=k1, BLOCK_SIZE=block_size,
            BM=t["hist_bm"], BN=t["hist_bn"], D=d, UPCAST=upcast, num_warps=t.get("hist_warps", t["warps"]),
            num_stages=t["stages"])
    grid = (triton.cdiv(plan.max_lq, t["own_bm"]), plan.cu_q.numel() - 1, h)
    _own_merge_kernel[grid](
        q, k, v, o, sel, po, pl, lse if store_lse else pl, plan.cu_q, plan.cu_k, scale, q.stride(0), q.stride(1),
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), o.stride(0), o.stride(1), G=h // hkv, H=h, K1=k1,
        BLOCK_SIZE=block_size, BM=t["own_bm"], BN=t["own_bn"], D=d, UPCAST=upcast,
        num_warps=t.get("own_warps", t["warps"]), num_stages=t["stages"], STORE_LSE=store_lse)
    return ForwardState(o, sel, blk_tok, lse)


def moba_attn_varlen_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                            block_size: int, topk: int, softmax_scale: float | None = None,
                            max_seqlen: int | None = None) -> torch.Tensor:
    """Exact MoBA self-attention over a packed batch: q [T, H, D], k/v [T, Hkv, D], cu_seqlens int32 [B+1]."""
    return moba_attn_varlen_qk_triton(q, k, v, cu_seqlens, cu_seqlens, block_size, topk, softmax_scale,
                                      max_seqlen, max_seqlen)


def moba_attn_prefix_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int, topk: int,
                            softmax_scale: float | None = None) -> torch.Tensor:
    """One sequence: q [Tq, H, D] are the last Tq of the Tk keys in k/v [Tk, Hkv, D]."""
    if q.dim() != 3 or k.dim() != 3:
        raise ValueError("moba_attn_prefix_triton takes q [Tq, H, D] and k/v [Tk, Hkv, D]")
    if q.shape[0] > k.shape[0]:
        raise ValueError(f"{q.shape[0]} queries for {k.shape[0]} keys: queries must be the last Tq <= Tk keys")
    cu_q = torch.tensor([0, q.shape[0]], dtype=torch.int32, device=q.device)
    cu_k = torch.tensor([0, k.shape[0]], dtype=torch.int32, device=q.device)
    return moba_attn_varlen_qk_triton(q, k, v, cu_q, cu_k, block_size, topk, softmax_scale, q.shape[0], k.shape[0])
