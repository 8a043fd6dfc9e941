"""The MoBA Triton kernels compiled on a CUDA GPU, bf16 and realistic head sizes, against the torch reference.

Kernel modules are imported inside the fixture: importing triton at collection on a CPU machine would put it in
compiled mode before the interpreter tests in tests/unit/kernels get to set TRITON_INTERPRET.
"""

from __future__ import annotations

import pytest
import torch

from crescent.kernels.moba.reference import moba_attn_prefix, moba_attn_varlen, moba_decode_paged

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def kernels():
    from crescent.kernels.moba import decode_triton, prefill_triton

    return prefill_triton, decode_triton


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert not torch.isnan(a).any()
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def _poison_empty(monkeypatch):
    """Outputs start as NaN, so an element the kernels never write fails the comparison."""
    real = torch.empty_like
    monkeypatch.setattr(torch, "empty_like", lambda t, **kw: real(t, **kw).fill_(float("nan")))


@pytest.mark.parametrize("lens,h,hkv,block,topk", [
    ([1000, 3000, 517], 8, 2, 256, 3),
    ([4096], 16, 16, 512, 3),
    ([2500, 700], 4, 4, 128, 12),
], ids=["varlen-gqa-b256", "mha-b512", "topk12-b128"])
def test_varlen_bf16(kernels, monkeypatch, lens, h, hkv, block, topk):
    prefill, _ = kernels
    _poison_empty(monkeypatch)
    g = torch.Generator(device="cuda").manual_seed(1)
    t = sum(lens)
    q, k, v = (torch.randn(t, n, 128, device="cuda", generator=g, dtype=torch.bfloat16) for n in (h, hkv, hkv))
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    out = prefill.moba_attn_varlen_triton(q, k, v, cu, block, topk)
    ref = moba_attn_varlen(q.float(), k.float(), v.float(), cu, block, topk)
    assert _rel_err(out, ref) < 1e-2


def test_prefix_chunk_fp32(kernels):
    prefill, _ = kernels
    g = torch.Generator(device="cuda").manual_seed(2)
    q, k, v = (torch.randn(1500, n, 64, device="cuda", generator=g) for n in (4, 2, 2))
    out = prefill.moba_attn_prefix_triton(q[-300:], k, v, 128, 4)
    ref = moba_attn_prefix(q[-300:], k, v, 128, 4)
    assert _rel_err(out, ref) < 3e-3  # tf32 dots on the GPU


@pytest.mark.parametrize("lens,topk", [([5000, 17, 2048, 300], 4), ([9000], 2)], ids=["batch4-top4", "long-top2"])
def test_decode_paged_bf16(kernels, lens, topk):
    _, decode = kernels
    page, mb, h, hkv, d = 16, 256, 8, 2, 128
    g = torch.Generator(device="cuda").manual_seed(3)
    need = [-(-n // page) for n in lens]
    perm = torch.randperm(sum(need) + 4, device="cuda", generator=g).to(torch.int32)
    kc = torch.randn(perm.numel(), page, hkv, d, device="cuda", generator=g, dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    tables = [perm[sum(need[:i]) : sum(need[: i + 1])].tolist() for i in range(len(lens))]
    bt = torch.tensor([t + [0] * (max(need) - len(t)) for t in tables], dtype=torch.int32, device="cuda")
    ctx = torch.tensor(lens, dtype=torch.int32, device="cuda")
    q = torch.randn(len(lens), h, d, device="cuda", generator=g, dtype=torch.bfloat16)
    pool = decode.MobaCentroidPool(1, kc.shape[0], hkv, d, page, mb, "cuda")
    pool.update(0, kc, tables, [0] * len(lens), lens)
    out = decode.moba_decode_paged_triton(q, kc, vc, bt, ctx, mb, topk, centroids=pool.layer(0))
    ref = moba_decode_paged(q.float(), kc.float(), vc.float(), bt, ctx, mb, topk)
    assert _rel_err(out, ref) < 1e-2
