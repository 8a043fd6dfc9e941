"""The MoBA reference against independent oracles: full causal SDPA and a loop-built masked softmax."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from crescent.kernels.moba import moba_attn_prefix, moba_attn_varlen, moba_centroids, moba_decode_paged


def _qkv(t: int, h: int, hkv: int, d: int, dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(t, n, d, generator=g).to(dtype) for n in (h, hkv, hkv)]


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp_min(1e-12))


def _oracle(q, k, v, block: int, topk: int) -> torch.Tensor:
    """Brute force, one (query, head) at a time: select blocks by loops, then one softmax over chosen keys."""
    t, h, d = q.shape
    groups = h // k.shape[1]
    out = torch.zeros(t, h, d, dtype=torch.float64)
    for head in range(h):
        kh, vh = k[:, head // groups].double(), v[:, head // groups].double()
        for i in range(t):
            own = i // block
            gates = []
            for blk in range(own):  # every earlier block is complete
                centroid = k[blk * block : (blk + 1) * block, head // groups].float().mean(0)
                gates.append((float(q[i, head].float() @ centroid), blk))
            chosen = {blk for _, blk in sorted(gates, reverse=True)[: topk - 1]} | {own}
            keys = [j for j in range(i + 1) if j // block in chosen]
            scores = torch.stack([q[i, head].double() @ kh[j] for j in keys]) / math.sqrt(d)
            out[i, head] = torch.softmax(scores, 0) @ vh[keys]
    return out


@pytest.mark.parametrize("t,block", [(63, 16), (40, 8), (7, 16)], ids=["T63-B16", "T40-B8", "T7-B16"])
def test_topk_covering_all_blocks_is_full_causal_attention(t, block):
    q, k, v = _qkv(t, 4, 2, 16)
    out = moba_attn_varlen(q, k, v, torch.tensor([0, t], dtype=torch.int32), block, topk=t // block + 1)
    ref = F.scaled_dot_product_attention(q.transpose(0, 1), k.repeat_interleave(2, 1).transpose(0, 1),
                                         v.repeat_interleave(2, 1).transpose(0, 1), is_causal=True).transpose(0, 1)
    assert _rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("topk", [1, 2, 3], ids=["k1", "k2", "k3"])
def test_matches_bruteforce_oracle_gqa(topk):
    q, k, v = _qkv(63, 8, 2, 8, seed=topk)
    out = moba_attn_varlen(q, k, v, torch.tensor([0, 63], dtype=torch.int32), 16, topk)
    assert _rel_err(out, _oracle(q, k, v, 16, topk)) < 1e-5


def test_varlen_sequences_are_independent():
    q, k, v = _qkv(50, 4, 1, 8, seed=3)
    cu = torch.tensor([0, 13, 13, 50], dtype=torch.int32)  # includes an empty sequence
    out = moba_attn_varlen(q, k, v, cu, 4, 2)
    assert _rel_err(out[:13], _oracle(q[:13], k[:13], v[:13], 4, 2)) < 1e-5
    assert _rel_err(out[13:], _oracle(q[13:], k[13:], v[13:], 4, 2)) < 1e-5


@pytest.mark.parametrize("tq", [1, 5, 37], ids=["tq1", "tq5", "tq37"])
def test_prefix_equals_varlen_tail(tq):
    q, k, v = _qkv(37, 6, 3, 8, seed=tq)
    full = moba_attn_varlen(q, k, v, torch.tensor([0, 37], dtype=torch.int32), 8, 3)
    out = moba_attn_prefix(q[-tq:], k, v, 8, 3)
    assert _rel_err(out, full[-tq:]) < 1e-6


def test_decode_paged_equals_varlen_last_token():
    page, block, d, hkv = 4, 8, 8, 2
    lens = [29, 8, 1]
    g = torch.Generator().manual_seed(7)
    k_cache = torch.full((32, page, hkv, d), float("nan"))  # unused pages poisoned: they must never be read
    v_cache = torch.full((32, page, hkv, d), float("nan"))
    tables = torch.zeros(3, 8, dtype=torch.int32)
    perm = torch.randperm(32, generator=g).tolist()
    expected, queries = [], []
    for b, n in enumerate(lens):
        q, k, v = _qkv(n, 4, hkv, d, seed=10 + b)
        pages = [perm.pop() for _ in range(math.ceil(n / page))]
        tables[b, : len(pages)] = torch.tensor(pages)
        for pos in range(n):
            k_cache[pages[pos // page], pos % page] = k[pos]
            v_cache[pages[pos // page], pos % page] = v[pos]
        expected.append(moba_attn_varlen(q, k, v, torch.tensor([0, n], dtype=torch.int32), block, 2)[-1])
        queries.append(q[-1])
    out = moba_decode_paged(torch.stack(queries), k_cache, v_cache, tables, torch.tensor(lens, dtype=torch.int32),
                            block, 2)
    assert _rel_err(out, torch.stack(expected)) < 1e-6


def test_decode_rejects_block_not_multiple_of_page():
    q = torch.zeros(1, 2, 4)
    cache = torch.zeros(2, 4, 1, 4)
    with pytest.raises(ValueError, match="multiple of the cache page size"):
        moba_decode_paged(q, cache, cache, torch.zeros(1, 2, dtype=torch.int32), torch.tensor([3]), 6, 2)


def test_bad_shapes_are_value_errors():
    q, k, v = _qkv(8, 3, 2, 4)
    with pytest.raises(ValueError, match="multiple of Hkv"):
        moba_attn_varlen(q, k, v, torch.tensor([0, 8]), 4, 2)
    q, k, v = _qkv(8, 4, 2, 4)
    with pytest.raises(ValueError, match="cu_seqlens"):
        moba_attn_varlen(q, k, v, torch.tensor([0, 5]), 4, 2)
    with pytest.raises(ValueError, match="last Tq"):
        moba_attn_prefix(q, k[:4], v[:4], 4, 2)


def test_centroids_are_block_means():
    k = torch.arange(2 * 10 * 1 * 2, dtype=torch.float32).reshape(2, 10, 1, 2)
    c = moba_centroids(k, 4)
    assert c.shape == (2, 2, 1, 2)
    assert torch.equal(c[1, 1], k[1, 4:8].mean(0))


def test_bf16_smoke_and_gradients():
    q, k, v = _qkv(33, 4, 2, 16, dtype=torch.bfloat16, seed=5)
    out = moba_attn_varlen(q, k, v, torch.tensor([0, 33], dtype=torch.int32), 8, 2)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert _rel_err(out, _oracle(q, k, v, 8, 2)) < 2e-2
    qf, kf, vf = (x.float().requires_grad_() for x in (q, k, v))
    moba_attn_varlen(qf, kf, vf, torch.tensor([0, 33], dtype=torch.int32), 8, 2).sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in (qf, kf, vf))
