"""The MoBA Triton kernels against the pure-torch reference, on CPU under the Triton interpreter.

How the kernels are loaded for that, and why the file may re-run itself in a fresh process: see
tests/unit/kernels/interpreter.py.
"""

from __future__ import annotations

import pytest
import torch

from crescent.kernels.moba.reference import (
    moba_attn_prefix,
    moba_attn_varlen,
    moba_centroids,
    moba_decode_paged,
)
from tests.unit.kernels.interpreter import (  # interpreter_env: the autouse fixture
    DEV,
    fresh_interpreter_test,
    interpreter_env,  # noqa: F401
    kernels_marker,
    load_kernels,
    rel_err,
)

_KERNEL_MODULES = ["crescent.kernels.moba.routing_triton", "crescent.kernels.moba.prefill_triton",
                   "crescent.kernels.moba.decode_triton"]
_MODS = load_kernels(_KERNEL_MODULES)
routing, prefill, decode = _MODS or (None, None, None)
needs_kernels = kernels_marker(_MODS)
test_in_fresh_interpreter = fresh_interpreter_test(_MODS, __file__)


def _qkv(lens: list[int], h: int, hkv: int, d: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    t = sum(lens)
    q, k, v = (torch.randn(t, n, d, generator=g).to(dtype).to(DEV) for n in (h, hkv, hkv))
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=DEV)
    return q, k, v, cu


def _tol(dtype: torch.dtype) -> float:
    return 2e-5 if dtype == torch.float32 else 5e-3


CASES = [  # lens, H, Hkv, D, block, topk
    pytest.param([37, 64, 5], 4, 2, 16, 16, 3, id="odd-lens-gqa"),
    pytest.param([12], 2, 2, 16, 16, 3, id="single-block"),
    pytest.param([70], 2, 1, 32, 16, 6, id="topk-ge-blocks"),
    pytest.param([53, 29], 2, 2, 16, 10, 2, id="block-not-pow2"),
    pytest.param([45], 3, 1, 16, 8, 1, id="topk1-own-only"),
    pytest.param([0, 33], 2, 2, 16, 16, 2, id="empty-seq"),
]


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("lens,h,hkv,d,block,topk", CASES)
def test_varlen_matches_reference(lens, h, hkv, d, block, topk, dtype):
    q, k, v, cu = _qkv(lens, h, hkv, d, dtype)
    out = prefill.moba_attn_varlen_triton(q, k, v, cu, block, topk)
    ref = moba_attn_varlen(q.cpu().float(), k.cpu().float(), v.cpu().float(), cu.cpu(), block, topk)
    assert out.dtype == dtype and out.shape == q.shape
    assert rel_err(out.cpu(), ref) < _tol(dtype)


@needs_kernels
def test_prefix_chunk_matches_reference():
    q, k, v, _ = _qkv([77], 4, 2, 16, torch.float32, seed=3)
    out = prefill.moba_attn_prefix_triton(q[-21:], k, v, 16, 3)
    ref = moba_attn_prefix(q[-21:].cpu(), k.cpu(), v.cpu(), 16, 3)
    assert rel_err(out.cpu(), ref) < 2e-5


@needs_kernels
def test_varlen_chunks_over_cached_prefixes_without_host_sync():
    """Queries are the last lq of lk keys per sequence; max_seqlen given, so cu_seqlens stay on the device."""
    lq, lk = [5, 20, 0], [40, 30, 9]
    q, _, _, cu_q = _qkv(lq, 4, 2, 16, torch.float32, seed=11)
    _, k, v, cu_k = _qkv(lk, 4, 2, 16, torch.float32, seed=12)
    out = prefill.moba_attn_varlen_qk_triton(q, k, v, cu_q, cu_k, 8, 3, max_seqlen_q=20, max_seqlen_k=40)
    ref = torch.cat([moba_attn_prefix(q[cu_q[i]:cu_q[i + 1]].cpu(), k[cu_k[i]:cu_k[i + 1]].cpu(),
                                      v[cu_k[i]:cu_k[i + 1]].cpu(), 8, 3) for i in range(2)])
    assert rel_err(out.cpu(), ref) < 2e-5


@needs_kernels
def test_routing_picks_reference_blocks():
    """Selected sets equal the reference's top-(k-1) over complete earlier blocks, per query head."""
    q, k, _, cu = _qkv([90], 2, 1, 16, torch.float32, seed=5)
    plan = prefill.make_plan(cu, cu, 8, 90, 90)
    cen, blk_tok = routing.block_centroids(k, plan.cu_k, plan.cu_nb, plan.nb_cap, plan.max_lk, 8)
    assert torch.allclose(cen.cpu(), moba_centroids(k.cpu(), 8), atol=1e-6)
    assert blk_tok.tolist() == list(range(0, 88, 8))
    sel = routing.route_prefill(q, cen, plan.cu_q, plan.cu_k, plan.cu_nb, plan.max_lq, 8, 4).cpu()
    gate = torch.einsum("thd,nd->thn", q.cpu(), cen[:, 0].cpu())
    for t in (0, 8, 17, 40, 89):
        for h in range(2):
            own = t // 8
            want = set(gate[t, h, :own].topk(min(3, own)).indices.tolist()) if own else set()
            got = {int(x) for x in sel[t, h] if x >= 0}
            assert got == want, (t, h)


@needs_kernels
def test_bad_input_raises_clear_errors():
    q, k, v, cu = _qkv([20], 4, 3, 16, torch.float32)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        prefill.moba_attn_varlen_triton(q, k, v, cu, 16, 2)
    q, k, v, cu = _qkv([20], 4, 2, 16, torch.float32)
    with pytest.raises(ValueError, match="cu_seqlens"):
        prefill.moba_attn_varlen_triton(q, k, v, cu[:1], 16, 2)
    with pytest.raises(ValueError, match="topk"):
        prefill.moba_attn_varlen_triton(q, k, v, cu, 16, 0)


def _paged(lens: list[int], h: int, hkv: int, d: int, page: int, dtype: torch.dtype, seed: int = 0):
    """A paged cache with pages handed out in shuffled order and stale slots poisoned with NaN."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-n // page) for n in lens]
    n_pages = sum(need) + 3
    order = torch.randperm(n_pages, generator=g).tolist()
    kc = torch.full((n_pages, page, hkv, d), float("nan"))
    vc = torch.full((n_pages, page, hkv, d), float("nan"))
    tables, i = [], 0
    for n, p in zip(lens, need, strict=False):
        pages = order[i : i + p]
        i += p
        for t in range(n):
            kc[pages[t // page], t % page] = torch.randn(hkv, d, generator=g)
            vc[pages[t // page], t % page] = torch.randn(hkv, d, generator=g)
        tables.append(pages)
    width = max(need)
    bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    q = torch.randn(len(lens), h, d, generator=g)
    ctx = torch.tensor(lens, dtype=torch.int32)
    return (q.to(dtype).to(DEV), kc.to(dtype).to(DEV), vc.to(dtype).to(DEV), bt.to(DEV), ctx.to(DEV), tables)


DECODE_CASES = [  # lens, H, Hkv, page, moba block, topk
    pytest.param([1, 37, 100], 4, 2, 4, 8, 3, id="batch-gqa"),
    pytest.param([9], 2, 2, 8, 16, 3, id="single-block"),
    pytest.param([70, 64], 2, 1, 4, 16, 9, id="topk-ge-blocks"),
    pytest.param([33], 2, 2, 4, 4, 1, id="topk1"),
]


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("lens,h,hkv,page,mb,topk", DECODE_CASES)
def test_decode_paged_matches_reference(lens, h, hkv, page, mb, topk, dtype):
    q, kc, vc, bt, ctx, _ = _paged(lens, h, hkv, 16, page, dtype)
    out = decode.moba_decode_paged_triton(q, kc, vc, bt, ctx, mb, topk, chunk=16)
    ref = moba_decode_paged(q.cpu().float(), kc.cpu().float(), vc.cpu().float(), bt.cpu(), ctx.cpu(), mb, topk)
    assert out.shape == q.shape and out.dtype == dtype
    assert rel_err(out.cpu(), ref) < _tol(dtype)


@needs_kernels
def test_centroid_pool_updates_incrementally():
    """Blocks filled over several steps give the same pool rows as one update over the whole context."""
    lens = [40, 23]
    q, kc, vc, bt, ctx, tables = _paged(lens, 2, 2, 16, 4, torch.float32, seed=7)
    step = decode.MobaCentroidPool(1, kc.shape[0], 2, 16, page_size=4, moba_block_size=8, device=DEV)
    written = step.update(0, kc, tables, [0, 0], [17, 9]) + step.update(0, kc, tables, [17, 9], lens)
    whole = decode.MobaCentroidPool(1, kc.shape[0], 2, 16, page_size=4, moba_block_size=8, device=DEV)
    assert written == whole.update(0, kc, tables, [0, 0], lens) == 5 + 2
    assert torch.equal(step.layer(0), whole.layer(0))
    last_page = tables[0][1]  # block 0 of sequence 0 covers pages 0-1
    assert torch.allclose(whole.layer(0)[last_page].cpu(), kc[tables[0][:2]].reshape(8, 2, 16).mean(0).cpu())
    out = decode.moba_decode_paged_triton(q, kc, vc, bt, ctx, 8, 3, centroids=whole.layer(0), chunk=16)
    ref = moba_decode_paged(q.cpu(), kc.cpu(), vc.cpu(), bt.cpu(), ctx.cpu(), 8, 3)
    assert rel_err(out.cpu(), ref) < 2e-5


@needs_kernels
def test_decode_rejects_bad_block_size():
    q, kc, vc, bt, ctx, _ = _paged([10], 2, 2, 16, 4, torch.float32)
    with pytest.raises(ValueError, match="multiple of the page size"):
        decode.moba_decode_paged_triton(q, kc, vc, bt, ctx, 6, 2)


@needs_kernels
def test_triton_backend_matches_torch_backend_over_prefill_and_decode():
    """The model-facing backend: a varlen prefill, then decode steps that fill MoBA blocks (pool upkeep)."""
    from crescent.models.attention import TorchAttentionBackend
    from crescent.models.attention_context import AttentionContext, SeqSlice
    from crescent.models.attention_triton import TritonAttentionBackend
    from crescent.models.config import AttentionSpec

    page, h, hkv, d, n_pages = 4, 4, 2, 16, 24
    spec = AttentionSpec(kind="moba", moba_block_size=8, moba_topk=2)
    g = torch.Generator().manual_seed(21)
    tables = [[5, 17, 2, 9, 11, 0, 22], [3, 8, 20, 14, 1, 6, 23]]
    caches = {name: [(torch.zeros(n_pages, page, hkv, d, device=DEV), torch.zeros(n_pages, page, hkv, d, device=DEV))]
              for name in ("torch", "triton")}
    backends = {"torch": TorchAttentionBackend(), "triton": TritonAttentionBackend()}
    lens = [0, 0]
    for new in ([19, 11], *([1, 1],) * 6):  # second sequence fills block 1 at length 16
        seqs, slots, start = [], [], 0
        for i, n in enumerate(new):
            lens[i] += n
            seqs.append(SeqSlice(start, start + n, lens[i], tables[i]))
            slots += [tables[i][p // page] * page + p % page for p in range(lens[i] - n, lens[i])]
            start += n
        q, k, v = (torch.randn(start, m, d, generator=g).to(DEV) for m in (h, hkv, hkv))
        outs = {name: backends[name].attend(0, q, k, v, AttentionContext(
            seqs, torch.tensor(slots, device=DEV), caches[name], block_size=page), spec) for name in backends}
        assert rel_err(outs["triton"].cpu(), outs["torch"].cpu()) < 2e-5, lens


def test_dispatch_uses_the_reference_on_cpu():
    from crescent.kernels.moba import dispatch

    q, k, v, cu = (t.cpu() for t in _qkv([30, 17], 4, 2, 16, torch.float32, seed=4))
    assert not dispatch.triton_available(q)
    assert torch.equal(dispatch.moba_attn_varlen_auto(q, k, v, cu, 8, 3), moba_attn_varlen(q, k, v, cu, 8, 3))
    assert torch.equal(dispatch.moba_attn_prefix_auto(q[:9], k[:30], v[:30], 8, 3),
                       moba_attn_prefix(q[:9], k[:30], v[:30], 8, 3))
