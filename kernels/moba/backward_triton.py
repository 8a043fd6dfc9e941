"""The backward of exact MoBA varlen prefill in Triton, FlashAttention-2 style: recompute from the saved LSE.

Routing is a hard top-k (not differentiable, as in MoBA's own code): the blocks the forward selected are reused,
and gradients flow through the selected attention only. With P = exp2(S * qk_scale - LSE) for every selected key,
    dV = P^T dO,   dS = P * (dO V^T - Delta) with Delta = rowsum(dO * O),   dQ = scale dS K,   dK = scale dS^T Q.

Four kernels, no atomics, every sum in a fixed order (deterministic, bit-reproducible run to run):
1. history dQ: the forward's tiles of (query, head, slot) pairs routed to one (key block, KV head); each pair's
   dQ partial over that block goes to its own row of a [Tq*H*(topk-1), D] buffer;
2. history dK/dV: one program per (key chunk, key block, KV head) loops over ALL pairs routed to that block
   (the pairs are sorted stably by block, so the order is fixed). Every query head of the group is among those
   pairs, so the GQA sum happens here. A two-pass (per tile partials, then a reduction) would balance popular
   blocks better but needs [tiles, block, D] scratch; atomics would be non-deterministic in fp32 and need an
   fp32 buffer per key anyway. The pair loop is what the forward's grouping already pays for;
3. own-block dK/dV: per (key chunk, sequence, KV head), the causal own block, G query heads in turn; adds the
   history part written by 2 (each key row is owned by one program in each kernel, so load-add-store is safe);
4. own-block dQ: per (query tile, sequence, head), then adds the history partials of its selected slots.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from crescent.kernels.moba.prefill_triton import LOG2E, VarlenPlan, _history_schedule
from crescent.kernels.moba.triton_common import next_pow2, upcast_tiles


@triton.jit
def _pair_rows(perm, rows, rmask, H: tl.constexpr, K1: tl.constexpr):
    """Flat pair index (t * H + h) * K1 + slot of each row of a sorted pair range, and its token and head."""
    f = tl.load(perm + rows, mask=rmask, other=0).to(tl.int64)
    return f, f // (H * K1), (f // K1) % H


@triton.jit
def _query_rows(Q, DO, LSE, DELTA, t, h, rmask, stride_qt, stride_qh, H: tl.constexpr, D: tl.constexpr,
                UPCAST: tl.constexpr):
    """q, dO, LSE and Delta of a tile of rows (token t, query head h: a scalar or one per row); dO is
    contiguous [T, H, D] and LSE/Delta [T, H]."""
    d = tl.arange(0, D)
    packed = t * H + h
    q = tl.load(Q + (t * stride_qt + h * stride_qh)[:, None] + d[None, :], mask=rmask[:, None], other=0.0)
    do = tl.load(DO + packed[:, None] * D + d[None, :], mask=rmask[:, None], other=0.0)
    lse = tl.load(LSE + packed, mask=rmask, other=0.0)
    delta = tl.load(DELTA + packed, mask=rmask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    return q, do, lse, delta


@triton.jit
def _hist_dq_kernel(Q, K, V, DO, LSE, DELTA, DQP, perm, tile_grp, tile_row0, grp_end, blk_tok, qk_scale, sm_scale,
                    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, NG,
                    H: tl.constexpr, HKV: tl.constexpr, K1: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                    BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, UPCAST: tl.constexpr):
    """One program per tile of pairs routed to one (key block, KV head): dQ of each pair over that block."""
    g = tl.load(tile_grp + tl.program_id(0))
    if g >= NG:
        return
    rows = tl.load(tile_row0 + tl.program_id(0)) + tl.arange(0, BM)
    rmask = rows < tl.load(grp_end + g)
    f, t, h = _pair_rows(perm, rows, rmask, H, K1)
    d = tl.arange(0, D)
    q, do, lse, delta = _query_rows(Q, DO, LSE, DELTA, t, h, rmask, stride_qt, stride_qh, H, D, UPCAST)
    k0 = tl.load(blk_tok + g // HKV).to(tl.int64)
    hk = g % HKV
    dq = tl.zeros([BM, D], tl.float32)
    for n in range(0, BLOCK_SIZE, BN):
        cols = n + tl.arange(0, BN)
        cmask = cols < BLOCK_SIZE
        k = tl.load(K + (k0 + cols)[:, None] * stride_kt + hk * stride_kh + d[None, :], mask=cmask[:, None], other=0.0)
        v = tl.load(V + (k0 + cols)[:, None] * stride_vt + hk * stride_vh + d[None, :], mask=cmask[:, None], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        p = tl.exp2(tl.dot(q, tl.trans(k)) * qk_scale - lse[:, None])
        p = tl.where(cmask[None, :] & rmask[:, None], p, 0.0)
        ds = p * (tl.dot(do, tl.trans(v)) - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k)
    tl.store(DQP + f[:, None] * D + d[None, :], dq * sm_scale, mask=rmask[:, None])


@triton.jit
def _hist_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, perm, grp_end, blk_tok, qk_scale, sm_scale,
                      stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                      H: tl.constexpr, HKV: tl.constexpr, K1: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                      BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, UPCAST: tl.constexpr):
    """One program per (key chunk, key block, KV head): dK/dV of the chunk over every pair routed to the block."""
    g = tl.program_id(1)
    start = tl.load(grp_end + g - 1, mask=g > 0, other=0)
    end = tl.load(grp_end + g)
    if start >= end:  # nobody routed here (or a table row past the batch): the zero-filled dK/dV stand
        return
    cols = tl.program_id(0) * BN + tl.arange(0, BN)
    cmask = cols < BLOCK_SIZE
    krow = tl.load(blk_tok + g // HKV).to(tl.int64) + cols
    hk = g % HKV
    d = tl.arange(0, D)
    k = tl.load(K + krow[:, None] * stride_kt + hk * stride_kh + d[None, :], mask=cmask[:, None], other=0.0)
    v = tl.load(V + krow[:, None] * stride_vt + hk * stride_vh + d[None, :], mask=cmask[:, None], other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    dk = tl.zeros([BN, D], tl.float32)
    dv = tl.zeros([BN, D], tl.float32)
    for r in range(start, end, BM):
        rows = r + tl.arange(0, BM)
        rmask = rows < end
        f, t, h = _pair_rows(perm, rows, rmask, H, K1)
        q, do, lse, delta = _query_rows(Q, DO, LSE, DELTA, t, h, rmask, stride_qt, stride_qh, H, D, UPCAST)
        p_t = tl.exp2(tl.dot(k, tl.trans(q)) * qk_scale - lse[None, :])  # [BN, BM]
        p_t = tl.where(rmask[None, :] & cmask[:, None], p_t, 0.0)
        dv += tl.dot(p_t.to(do.dtype), do)
        ds_t = p_t * (tl.dot(v, tl.trans(do)) - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q)
    out = krow[:, None] * (HKV * D) + hk * D + d[None, :]
    tl.store(DK + out, dk * sm_scale, mask=cmask[:, None])
    tl.store(DV + out, dv, mask=cmask[:, None])


@triton.jit
def _own_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, cu, qk_scale, sm_scale,
                     stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                     G: tl.constexpr, HKV: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, UPCAST: tl.constexpr):
    """One program per (key chunk, sequence, KV head): causal own-block dK/dV summed over the G query heads,
    added to the history part already in DK/DV."""
    i = tl.program_id(1)
    hk = tl.program_id(2)
    t0 = tl.load(cu + i).to(tl.int64)
    seq_len = tl.load(cu + i + 1) - t0
    n0 = tl.program_id(0) * BN
    if n0 >= seq_len:
        return
    cols = n0 + tl.arange(0, BN)
    cmask = cols < seq_len
    key_blk = cols // BLOCK_SIZE
    d = tl.arange(0, D)
    k = tl.load(K + (t0 + cols)[:, None] * stride_kt + hk * stride_kh + d[None, :], mask=cmask[:, None], other=0.0)
    v = tl.load(V + (t0 + cols)[:, None] * stride_vt + hk * stride_vh + d[None, :], mask=cmask[:, None], other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    # Only queries at or after the chunk's first key, up to the end of its last key's block, see these keys.
    q_hi = tl.minimum(((tl.minimum(n0 + BN, seq_len) - 1) // BLOCK_SIZE + 1) * BLOCK_SIZE, seq_len)
    dk = tl.zeros([BN, D], tl.float32)
    dv = tl.zeros([BN, D], tl.float32)
    for hh in range(G):
        h = hk * G + hh
        for m in range(n0, q_hi, BM):
            rows = m + tl.arange(0, BM)
            rmask = rows < q_hi
            trow = t0 + rows
            q, do, lse, delta = _query_rows(Q, DO, LSE, DELTA, trow, h, rmask, stride_qt, stride_qh, G * HKV, D,
                                            UPCAST)
            keep = (rows[None, :] >= cols[:, None]) & ((rows // BLOCK_SIZE)[None, :] == key_blk[:, None])
            keep = keep & rmask[None, :] & cmask[:, None]
            p_t = tl.where(keep, tl.exp2(tl.dot(k, tl.trans(q)) * qk_scale - lse[None, :]), 0.0)
            dv += tl.dot(p_t.to(do.dtype), do)
            ds_t = p_t * (tl.dot(v, tl.trans(do)) - delta[None, :])
            dk += tl.dot(ds_t.to(q.dtype), q)
    out = (t0 + cols)[:, None] * (HKV * D) + hk * D + d[None, :]
    dk_prev = tl.load(DK + out, mask=cmask[:, None], other=0.0)
    dv_prev = tl.load(DV + out, mask=cmask[:, None], other=0.0)
    tl.store(DK + out, dk_prev + dk * sm_scale, mask=cmask[:, None])
    tl.store(DV + out, dv_prev + dv, mask=cmask[:, None])


@triton.jit
def _own_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, SEL, DQP, cu, qk_scale, sm_scale,
                   stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                   G: tl.constexpr, H: tl.constexpr, K1: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, UPCAST: tl.constexpr):
    """One program per (query tile, sequence, head): causal own-block dQ plus the history partials."""
    i = tl.program_id(1)
    h = tl.program_id(2)
    t0 = tl.load(cu + i).to(tl.int64)
    seq_len = tl.load(cu + i + 1) - t0
    m0 = tl.program_id(0) * BM
    if m0 >= seq_len:
        return
    rows = m0 + tl.arange(0, BM)
    rmask = rows < seq_len
    trow = t0 + rows
    d = tl.arange(0, D)
    q, do, lse, delta = _query_rows(Q, DO, LSE, DELTA, trow, h, rmask, stride_qt, stride_qh, H, D, UPCAST)
    hk = h // G
    own_start = (rows // BLOCK_SIZE) * BLOCK_SIZE
    kv_hi = tl.minimum(m0 + BM, seq_len)
    dq = tl.zeros([BM, D], tl.float32)
    for n in range((m0 // BLOCK_SIZE) * BLOCK_SIZE, kv_hi, BN):
        cols = n + tl.arange(0, BN)
        cmask = cols < kv_hi
        k = tl.load(K + (t0 + cols)[:, None] * stride_kt + hk * stride_kh + d[None, :], mask=cmask[:, None],
                    other=0.0)
        v = tl.load(V + (t0 + cols)[:, None] * stride_vt + hk * stride_vh + d[None, :], mask=cmask[:, None],
                    other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        keep = (cols[None, :] >= own_start[:, None]) & (cols[None, :] <= rows[:, None]) & cmask[None, :]
        keep = keep & rmask[:, None]
        p = tl.where(keep, tl.exp2(tl.dot(q, tl.trans(k)) * qk_scale - lse[:, None]), 0.0)
        ds = p * (tl.dot(do, tl.trans(v)) - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k)
    dq = dq * sm_scale
    for slot in range(K1):
        fl = (trow * H + h) * K1 + slot
        valid = rmask & (tl.load(SEL + fl, mask=rmask, other=-1) >= 0)
        dq += tl.load(DQP + fl[:, None] * D + d[None, :], mask=valid[:, None], other=0.0)
    tl.store(DQ + (trow * H + h)[:, None] * D + d[None, :], dq.to(DQ.dtype.element_ty), mask=rmask[:, None])


def _bwd_tiles(q: torch.Tensor) -> dict:
    if upcast_tiles(q):  # interpreter: tiny test shapes, and every program costs Python time
        return dict(hist_bm=16, hist_bn=16, dkdv_bm=16, dkdv_bn=16, dq_bm=16, dq_bn=16, warps=4, stages=1)
    # FlashAttention-2's Triton tutorial shapes: narrow query tiles against wide key tiles for dK/dV, the
    # transpose for dQ. Untuned here (no GPU in this change's session): bench before trusting them.
    return dict(hist_bm=64, hist_bn=64, dkdv_bm=32, dkdv_bn=64, dq_bm=64, dq_bn=32, warps=4, stages=2)


def moba_varlen_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                         lse: torch.Tensor, sel: torch.Tensor, blk_tok: torch.Tensor, plan: VarlenPlan,
                         block_size: int, topk: int, softmax_scale: float | None = None,
                         tiles: dict | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dQ, dK, dV of MoBA self-attention (``plan.cu_q == plan.cu_k``), from a ``varlen_forward(store_lse=True)``.

    do/q/out [T, H, D], k/v [T, Hkv, D], lse [T, H] fp32 (log2 domain), sel [T, H, topk-1]. Gradients come
    back in the inputs' dtypes (dK/dV accumulate in fp32 first).
    """
    h, hkv, d = q.shape[1], k.shape[1], q.shape[2]
    t = {**_bwd_tiles(q), **(tiles or {})}
    sm_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    qk_scale, k1, upcast = sm_scale * LOG2E, topk - 1, upcast_tiles(q)
    do = do.to(q.dtype).contiguous()
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
    dv = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
    if q.shape[0] == 0 or plan.max_lq == 0:
        return dq.zero_(), dk.to(k.dtype), dv.to(v.dtype)
    # Delta = rowsum(dO * O), with the O the caller saw (rounded to q's dtype), as FlashAttention does.
    delta = (do.float() * out.float()).sum(-1).contiguous()
    lse = lse.contiguous()
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1))
    launch = dict(D=d, UPCAST=upcast, num_warps=t["warps"], num_stages=t["stages"])
    dqp = torch.empty(q.shape[0] * h * k1, d, dtype=torch.float32, device=q.device)
    blk_bn = min(t["hist_bn"], next_pow2(block_size))  # small MoBA blocks (training) waste no masked columns
    if k1 > 0 and plan.nb_cap > 0:
        perm, grp, row0, grp_end, ng, n_tiles = _history_schedule(sel, plan.nb_cap, hkv, t["hist_bm"], stable=True)
        _hist_dq_kernel[(n_tiles,)](q, k, v, do, lse, delta, dqp, perm, grp, row0, grp_end, blk_tok, qk_scale,
                                    sm_scale, *strides, ng, H=h, HKV=hkv, K1=k1, BLOCK_SIZE=block_size,
                                    BM=t["hist_bm"], BN=blk_bn, **launch)
        _hist_dkdv_kernel[(triton.cdiv(block_size, blk_bn), ng)](
            q, k, v, do, lse, delta, dk, dv, perm, grp_end, blk_tok, qk_scale, sm_scale, *strides, H=h, HKV=hkv,
            K1=k1, BLOCK_SIZE=block_size, BM=t["dkdv_bm"], BN=blk_bn, **launch)
    n_seq = plan.cu_q.numel() - 1
    _own_dkdv_kernel[(triton.cdiv(plan.max_lk, t["dkdv_bn"]), n_seq, hkv)](
        q, k, v, do, lse, delta, dk, dv, plan.cu_k, qk_scale, sm_scale, *strides, G=h // hkv, HKV=hkv,
        BLOCK_SIZE=block_size, BM=t["dkdv_bm"], BN=t["dkdv_bn"], **launch)
    _own_dq_kernel[(triton.cdiv(plan.max_lq, t["dq_bm"]), n_seq, h)](
        q, k, v, do, lse, delta, dq, sel, dqp, plan.cu_q, qk_scale, sm_scale, *strides, G=h // hkv, H=h, K1=k1,
        BLOCK_SIZE=block_size, BM=t["dq_bm"], BN=t["dq_bn"], **launch)
    return dq, dk.to(k.dtype), dv.to(v.dtype)
