"""MoBA (Mixture of Block Attention) in plain torch: the reference every MoBA kernel is tested against.

The rule (ARCHITECTURE.md, "MoBA, precisely"): keys are split into blocks of ``block_size`` tokens. A query at
position t in block b(t) always attends to its own block (causally); among the *complete* blocks before b(t) it
picks the top ``topk - 1`` by ``q . mean(K_block)`` (fp32, no softmax scale). Softmax runs over the selected keys
only. Routing is per query head (GQA: a query head routes on its KV head's keys). The own-block and the history
parts are computed separately and merged by log-sum-exp, the way the kernels do it.

Shapes follow FlashAttention: ``q [total, H, D]``, ``k``/``v`` ``[total, Hkv, D]``, ``cu_seqlens`` int32 ``[B+1]``.
Everything here is differentiable torch (the routing itself is a hard, non-differentiable choice, as in MoBA).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

_QUERY_CHUNK = 512  # bounds the [H, Tq, Tk] score matrix on long prefills
_EMPTY_LSE = -1e30  # finite "log of zero": keeps exp() and its gradient NaN-free when no history is selected


def moba_centroids(k: Tensor, block_size: int) -> Tensor:
    """Mean key of every complete block: ``k [..., Tk, Hkv, D]`` -> fp32 ``[..., Tk // block_size, Hkv, D]``."""
    n_full = k.shape[-3] // block_size
    blocks = k[..., : n_full * block_size, :, :].float()
    return blocks.reshape(*k.shape[:-3], n_full, block_size, *k.shape[-2:]).mean(dim=-3)


def moba_attn_varlen(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, block_size: int, topk: int,
                     softmax_scale: float | None = None) -> Tensor:
    """MoBA causal self-attention over packed sequences; each sequence's keys start at position 0.

    q ``[total, H, D]``, k/v ``[total, Hkv, D]``, cu_seqlens int ``[B+1]`` -> out ``[total, H, D]`` (q's dtype).
    """
    _check_qkv(q, k, v, block_size, topk)
    bounds = [int(x) for x in cu_seqlens.tolist()]
    if bounds[0] != 0 or bounds[-1] != q.shape[0] or any(b > a for a, b in zip(bounds[1:], bounds[:-1], strict=True)):
        raise ValueError(f"cu_seqlens={bounds} must rise from 0 to the token count {q.shape[0]}")
    if k.shape[0] != q.shape[0]:
        raise ValueError(f"varlen q has {q.shape[0]} tokens but k has {k.shape[0]}: self-attention needs both equal")
    outs = [moba_attn_prefix(q[s:e], k[s:e], v[s:e], block_size, topk, softmax_scale)
            for s, e in zip(bounds[:-1], bounds[1:], strict=True) if e > s]
    return torch.cat(outs) if outs else q.new_empty(q.shape)


def moba_attn_prefix(q: Tensor, k: Tensor, v: Tensor, block_size: int, topk: int,
                     softmax_scale: float | None = None) -> Tensor:
    """The queries are the LAST ``Tq`` positions of a ``Tk``-long context (chunked prefill, prefix-cache hit).

    q ``[Tq, H, D]``, k/v ``[Tk, Hkv, D]`` with ``Tq <= Tk`` -> out ``[Tq, H, D]``.
    """
    _check_qkv(q, k, v, block_size, topk)
    tq, tk = q.shape[0], k.shape[0]
    if tq > tk:
        raise ValueError(f"moba_attn_prefix got {tq} queries for {tk} keys: queries must be the last Tq <= Tk keys")
    scale = _scale(q, softmax_scale)
    positions = torch.arange(tk - tq, tk, device=q.device)
    outs = []
    for s in range(0, tq, _QUERY_CHUNK):
        # A query chunk never needs keys past its last position.
        pos = positions[s : s + _QUERY_CHUNK]
        kv_end = int(pos[-1]) + 1
        out = _moba_core(q[None, s : s + _QUERY_CHUNK], k[None, :kv_end], v[None, :kv_end], pos[None],
                         block_size, topk, scale)
        outs.append(out[0])
    return torch.cat(outs) if outs else q.new_empty(q.shape)


def moba_decode_paged(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, context_lens: Tensor,
                      moba_block_size: int, topk: int, softmax_scale: float | None = None) -> Tensor:
    """One new token per sequence, its K/V already in the paged cache at position ``context_len - 1``.

    q ``[B, H, D]``; k_cache/v_cache ``[num_pages, page_size, Hkv, D]``; block_tables int ``[B, max_pages]``;
    context_lens int ``[B]`` -> out ``[B, H, D]``. ``moba_block_size`` must be a multiple of ``page_size`` so a
    MoBA block is whole pages (the kernels keep one centroid per full MoBA block).
    """
    page_size = k_cache.shape[1]
    if moba_block_size % page_size:
        raise ValueError(f"moba_block_size={moba_block_size} is not a multiple of the cache page size {page_size}: "
                         "pick a MoBA block size that is a whole number of pages")
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"expected q [B,H,D] and caches [pages,page_size,Hkv,D]; got {tuple(q.shape)}, "
                         f"{tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    lens = context_lens.to(device=q.device, dtype=torch.long)
    if lens.numel() != q.shape[0] or bool((lens < 1).any()):
        raise ValueError(f"context_lens={lens.tolist()} must hold one length >= 1 per query")
    k, v = gather_paged(k_cache, v_cache, block_tables, lens)
    scale = _scale(q, softmax_scale)
    out = _moba_core(q[:, None], k, v, (lens - 1)[:, None], moba_block_size, topk, scale)
    return out[:, 0]


def gather_paged(k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, context_lens: Tensor
                 ) -> tuple[Tensor, Tensor]:
    """Read each sequence's context back from pages: -> k, v ``[B, max(context_lens), Hkv, D]``, zero-padded."""
    page_size = k_cache.shape[1]
    max_len = int(context_lens.max())
    pos = torch.arange(max_len, device=k_cache.device)
    tables = block_tables.to(device=k_cache.device, dtype=torch.long)
    if tables.shape[1] * page_size < max_len:
        raise ValueError(f"block_tables cover {tables.shape[1] * page_size} tokens but a context is {max_len} long")
    slots = tables[:, pos // page_size] * page_size + pos % page_size
    valid = pos[None, :] < context_lens.to(k_cache.device)[:, None]
    slots = torch.where(valid, slots, torch.zeros_like(slots))
    flat_k = k_cache.reshape(-1, *k_cache.shape[2:])
    flat_v = v_cache.reshape(-1, *v_cache.shape[2:])
    keep = valid[:, :, None, None]
    # where(), not a multiply: stale slots may hold anything (NaN included) and must not leak.
    return (torch.where(keep, flat_k[slots], torch.zeros((), dtype=k_cache.dtype, device=k_cache.device)),
            torch.where(keep, flat_v[slots], torch.zeros((), dtype=v_cache.dtype, device=v_cache.device)))


def _moba_core(q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, block_size: int, topk: int, scale: float) -> Tensor:
    """q ``[B, Tq, H, D]`` at absolute positions ``q_pos [B, Tq]``; k/v ``[B, Tk, Hkv, D]`` -> ``[B, Tq, H, D]``.

    Keys past a query's position are never attended, so zero padding beyond a sequence's length is harmless.
    """
    groups = q.shape[2] // k.shape[2]
    qf = q.float().transpose(1, 2)  # [B, H, Tq, D]
    kf = k.float().repeat_interleave(groups, dim=2).transpose(1, 2)  # [B, H, Tk, D]
    vf = v.float().repeat_interleave(groups, dim=2).transpose(1, 2)
    key_pos = torch.arange(k.shape[1], device=q.device)
    q_blk = q_pos // block_size
    own = (key_pos[None, None, :] <= q_pos[:, :, None]) & ((key_pos // block_size)[None, None, :] == q_blk[:, :, None])
    history = _history_mask(qf, k, q_blk, block_size, topk, groups)
    scores = torch.matmul(qf, kf.transpose(-1, -2)) * scale
    out_own, lse_own = _masked_softmax_attention(scores, own[:, None], vf)
    out_hist, lse_hist = _masked_softmax_attention(scores, history, vf)
    lse = torch.logaddexp(lse_own, lse_hist)
    out = out_own * torch.exp(lse_own - lse)[..., None] + out_hist * torch.exp(lse_hist - lse)[..., None]
    return out.transpose(1, 2).to(q.dtype)


@torch.no_grad()
def _history_mask(qf: Tensor, k: Tensor, q_blk: Tensor, block_size: int, topk: int, groups: int) -> Tensor:
    """Keys of the top-(topk-1) complete earlier blocks, per query head: bool ``[B, H, Tq, Tk]``."""
    b, h, tq, _ = qf.shape
    tk = k.shape[1]
    n_full = tk // block_size
    if topk <= 1 or n_full == 0:
        return torch.zeros(b, h, tq, tk, dtype=torch.bool, device=qf.device)
    centroids = moba_centroids(k, block_size).repeat_interleave(groups, dim=2).transpose(1, 2)  # [B, H, n, D]
    gate = torch.matmul(qf, centroids.transpose(-1, -2))  # [B, H, Tq, n], fp32, no softmax scale
    # Blocks strictly before the query's own block are complete and wholly in its past.
    eligible = (torch.arange(n_full, device=qf.device)[None, None, :] < q_blk[:, :, None])[:, None]
    gate = gate.masked_fill(~eligible, float("-inf"))
    top = gate.topk(min(topk - 1, n_full), dim=-1).indices
    chosen = torch.zeros_like(gate, dtype=torch.bool).scatter_(-1, top, True) & eligible
    key_pos = torch.arange(tk, device=qf.device)
    key_blk = (key_pos // block_size).clamp(max=n_full - 1)
    return chosen[..., key_blk] & (key_pos < n_full * block_size)


def _masked_softmax_attention(scores: Tensor, mask: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Softmax attention restricted to ``mask``: -> (out ``[..., Tq, D]``, lse ``[..., Tq]``); empty rows give 0."""
    s = scores.masked_fill(~mask, float("-inf"))
    row_max = s.amax(dim=-1, keepdim=True).detach()
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    p = torch.exp(s - row_max)
    denom = p.sum(dim=-1, keepdim=True)
    out = torch.matmul(p, v) / denom.clamp_min(1e-30)
    lse = torch.where(denom > 0, row_max + torch.log(denom.clamp_min(1e-30)), torch.full_like(denom, _EMPTY_LSE))
    return out, lse[..., 0]


def _scale(q: Tensor, softmax_scale: float | None) -> float:
    return softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])


def _check_qkv(q: Tensor, k: Tensor, v: Tensor, block_size: int, topk: int) -> None:
    if q.dim() != 3 or k.dim() != 3 or k.shape != v.shape:
        raise ValueError(f"expected q [T,H,D], k/v [T,Hkv,D]; got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if q.shape[-1] != k.shape[-1] or q.shape[1] % k.shape[1]:
        raise ValueError(f"q heads/dim {tuple(q.shape[1:])} do not fit k {tuple(k.shape[1:])}: "
                         "head_dim must match and H must be a multiple of Hkv")
    if block_size < 1 or topk < 1:
        raise ValueError(f"block_size={block_size}, topk={topk}: both must be >= 1")
