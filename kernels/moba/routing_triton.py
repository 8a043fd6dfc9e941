"""MoBA routing in Triton: key-block centroids and each query's top-(k-1) complete earlier blocks.

Routing is exact to the rule in ARCHITECTURE.md: fp32 centroids (mean of a complete block's keys), fp32 q.centroid
scores without the softmax scale, per query head on its KV head's centroids, only blocks strictly before the query's
own block. The top-k is kept as a running list over chunks of centroids, so any number of blocks fits in registers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

NEG_INF = float("-inf")


@triton.jit
def _centroid_kernel(K, C, BLK_TOK, cu_k, cu_nb, stride_kt, stride_kh, stride_cb, stride_ch,
                     BLOCK_SIZE: tl.constexpr, BR: tl.constexpr, D: tl.constexpr):
    """One program per (block j, sequence, KV head): fp32 mean of the block's keys if the block is complete.
    Also records where each block starts (BLK_TOK), so nothing about the batch layout is read on the host."""
    j = tl.program_id(0)
    i = tl.program_id(1)
    hk = tl.program_id(2)
    k0 = tl.load(cu_k + i)
    if j >= (tl.load(cu_k + i + 1) - k0) // BLOCK_SIZE:
        return
    row = tl.load(cu_nb + i) + j
    t0 = (k0 + j * BLOCK_SIZE).to(tl.int64)
    d = tl.arange(0, D)
    acc = tl.zeros([BR, D], dtype=tl.float32)
    for r in range(0, BLOCK_SIZE, BR):
        rows = r + tl.arange(0, BR)
        ptr = K + (t0 + rows)[:, None] * stride_kt + hk * stride_kh + d[None, :]
        acc += tl.load(ptr, mask=(rows < BLOCK_SIZE)[:, None], other=0.0).to(tl.float32)
    tl.store(C + row * stride_cb + hk * stride_ch + d, tl.sum(acc, 0) / BLOCK_SIZE)
    if hk == 0:
        tl.store(BLK_TOK + row, t0.to(tl.int32))


@triton.jit
def topk_merge(best_v, best_i, s, cols, KP: tl.constexpr, K1: tl.constexpr):
    """Merge a chunk of scores ``s`` [M, N] (columns ``cols``) into the running top-K1 ``best_v/best_i`` [M, KP].

    Kept sorted by descending score; ties go to the lower block index (earlier chunks hold lower indices).
    Empty entries have value -inf; callers map those to -1.
    """
    kc = tl.arange(0, KP)
    new_v = tl.full(best_v.shape, float("-inf"), tl.float32)
    new_i = tl.full(best_i.shape, -1, tl.int32)
    for r in tl.static_range(K1):
        m_new = tl.max(s, 1)
        m_old = tl.max(best_v, 1)
        take_old = m_old >= m_new
        i_new = tl.min(tl.where(s == m_new[:, None], cols[None, :], 2147483647), 1)
        p_old = tl.min(tl.where(best_v == m_old[:, None], kc[None, :], KP), 1)
        i_old = tl.sum(tl.where(kc[None, :] == p_old[:, None], best_i, 0), 1)
        new_v = tl.where(kc[None, :] == r, tl.maximum(m_new, m_old)[:, None], new_v)
        new_i = tl.where(kc[None, :] == r, tl.where(take_old, i_old, i_new)[:, None], new_i)
        best_v = tl.where(take_old[:, None] & (kc[None, :] == p_old[:, None]), float("-inf"), best_v)
        s = tl.where((~take_old)[:, None] & (cols[None, :] == i_new[:, None]), float("-inf"), s)
    return new_v, new_i


@triton.jit
def _route_prefill_kernel(Q, C, SEL, cu_q, cu_k, cu_nb, stride_qt, stride_qh, stride_cb, stride_ch,
                          stride_st, stride_sh, G: tl.constexpr, BLOCK_SIZE: tl.constexpr, K1: tl.constexpr,
                          KP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr,
                          PREC: tl.constexpr):
    """One program per (query tile, sequence, query head): top-K1 earlier complete blocks for each query, as
    global rows of the centroid table. PREC "tf32x3" (GPU) keeps fp32 accuracy on the tensor cores."""
    pid_m = tl.program_id(0)
    i = tl.program_id(1)
    h = tl.program_id(2)
    q0 = tl.load(cu_q + i)
    lq = tl.load(cu_q + i + 1) - q0
    lk = tl.load(cu_k + i + 1) - tl.load(cu_k + i)
    if pid_m * BM >= lq:
        return
    off = lk - lq  # queries are the last lq of the lk keys
    rows = pid_m * BM + tl.arange(0, BM)
    rmask = rows < lq
    own = (off + rows) // BLOCK_SIZE
    d = tl.arange(0, D)
    q = tl.load(Q + (q0 + rows).to(tl.int64)[:, None] * stride_qt + h * stride_qh + d[None, :],
                mask=rmask[:, None], other=0.0).to(tl.float32)
    nb0 = tl.load(cu_nb + i)
    n_hi = (off + tl.minimum(pid_m * BM + BM, lq) - 1) // BLOCK_SIZE  # largest own block in the tile
    hk = h // G
    best_v = tl.full([BM, KP], float("-inf"), tl.float32)
    best_i = tl.full([BM, KP], -1, tl.int32)
    for n in range(0, n_hi, BN):
        cols = n + tl.arange(0, BN)
        c = tl.load(C + (nb0 + cols)[:, None] * stride_cb + hk * stride_ch + d[None, :],
                    mask=(cols < n_hi)[:, None], other=0.0)
        s = tl.dot(q, tl.trans(c), input_precision=PREC)
        s = tl.where(cols[None, :] < own[:, None], s, float("-inf"))
        best_v, best_i = topk_merge(best_v, best_i, s, cols, KP, K1)
    sel = tl.where(best_v > float("-inf"), nb0 + best_i, -1)
    kc = tl.arange(0, KP)
    ptr = SEL + (q0 + rows).to(tl.int64)[:, None] * stride_st + h * stride_sh + kc[None, :]
    tl.store(ptr, sel, mask=rmask[:, None] & (kc[None, :] < K1))


def score_precision(t: torch.Tensor) -> str:
    """fp32-accurate q.centroid products: tf32x3 on the tensor cores on CUDA; plain fp32 in the interpreter."""
    return "ieee" if t.device.type != "cuda" else "tf32x3"


def block_centroids(k: torch.Tensor, cu_k: torch.Tensor, cu_nb: torch.Tensor, nb_cap: int, max_lk: int,
                    block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Centroids [nb_cap, Hkv, D] fp32 of every complete key block (sequence i's at rows cu_nb[i]..) and the
    flat key row where each block starts, int32 [nb_cap]. Rows past cu_nb[-1] are unused."""
    hkv, d = k.shape[1], k.shape[2]
    cen = torch.empty(nb_cap, hkv, d, dtype=torch.float32, device=k.device)
    blk_tok = torch.empty(nb_cap, dtype=torch.int32, device=k.device)
    if nb_cap == 0 or max_lk < block_size:
        return cen, blk_tok
    br = min(64, max(16, triton.next_power_of_2(block_size)))
    _centroid_kernel[(max_lk // block_size, cu_k.numel() - 1, hkv)](
        k, cen, blk_tok, cu_k, cu_nb, k.stride(0), k.stride(1), cen.stride(0), cen.stride(1),
        BLOCK_SIZE=block_size, BR=br, D=d, num_warps=4)
    return cen, blk_tok


def route_prefill(q: torch.Tensor, centroids: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
                  cu_nb: torch.Tensor, max_lq: int, block_size: int, topk: int, bm: int = 16,
                  max_blocks: int | None = None) -> torch.Tensor:
    """Selected history blocks SEL [Tq, H, topk-1] int32, as rows of the centroid table (-1 = none).

    q [Tq, H, D]; centroids [NB, Hkv, D] fp32, sequence i's at rows cu_nb[i]..cu_nb[i+1]; cu_q/cu_k [B+1] int32.
    """
    tq, h, d = q.shape
    k1 = topk - 1
    sel = torch.empty(tq, h, k1, dtype=torch.int32, device=q.device)
    if tq == 0 or k1 == 0:
        return sel
    grid = (triton.cdiv(max_lq, bm), cu_q.numel() - 1, h)
    # Centroid chunk: no wider than the most blocks a sequence has (few long blocks: no wasted columns).
    bn = min(64 if d <= 128 else 32, max(16, triton.next_power_of_2(max_blocks or 64)))
    _route_prefill_kernel[grid](q, centroids, sel, cu_q, cu_k, cu_nb, q.stride(0), q.stride(1),
                                centroids.stride(0), centroids.stride(1), sel.stride(0), sel.stride(1),
                                G=h // centroids.shape[1], BLOCK_SIZE=block_size, K1=k1,
                                KP=max(2, triton.next_power_of_2(k1)), BM=bm, BN=bn, D=d,
                                PREC=score_precision(q), num_warps=4)
    return sel
