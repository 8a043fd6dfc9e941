"""crescent.kernels.cpu.paged_decode against the torch decode path it replaces, and its fallbacks."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from crescent.kernels import cpu
from crescent.models import attention
from crescent.models.attention_context import SeqSlice
from crescent.models.config import AttentionSpec


def _case(dtype, lens, heads=9, kv_heads=3, dim=64, block_size=16, seed=0):
    """Random caches with every sequence's blocks scattered; the slots past each context hold NaN, so a kernel that
    reads past a context's end shows it."""
    gen = torch.Generator().manual_seed(seed)
    needed = [-(-n // block_size) for n in lens]
    num_blocks = sum(needed) + 3
    k_cache = torch.randn(num_blocks, block_size, kv_heads, dim, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, dim, generator=gen).to(dtype)
    order = torch.randperm(num_blocks, generator=gen).tolist()
    seqs, tables = [], []
    for i, (n, blocks) in enumerate(zip(lens, needed, strict=True)):
        table = [order.pop() for _ in range(blocks)]
        last = table[-1]
        k_cache[last, n - (blocks - 1) * block_size :] = float("nan")
        v_cache[last, n - (blocks - 1) * block_size :] = float("nan")
        seqs.append(SeqSlice(i, i + 1, n, table))
        tables.append(torch.tensor(table))
    q = torch.randn(len(lens), heads, dim, generator=gen).to(dtype)
    dec = attention._decode_index(seqs, tables, None, block_size, torch.device("cpu"))
    return q, k_cache, v_cache, dec


def test_the_kernels_build_and_load_here():
    assert cpu.available(), cpu.unavailable_reason()


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-12), (torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("lens", [[1], [5, 16, 17, 33], [300, 7, 129, 64, 2, 250]])
def test_paged_decode_matches_the_torch_decode_path(dtype, tol, lens):
    q, k_cache, v_cache, dec = _case(dtype, lens)
    want = attention._decode(q, k_cache, v_cache, dec, AttentionSpec(), attention._Scratch())
    got = cpu.paged_decode(q, k_cache, v_cache, dec.block_tables, dec.context_lens)
    assert got.dtype == dtype and got.shape == q.shape
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize(("heads", "kv_heads", "dim", "block_size"), [(4, 4, 32, 4), (8, 1, 16, 8), (6, 2, 48, 32)])
def test_paged_decode_handles_other_head_layouts(heads, kv_heads, dim, block_size):
    q, k_cache, v_cache, dec = _case(torch.float32, [3, 40, 71], heads, kv_heads, dim, block_size, seed=1)
    want = attention._decode(q, k_cache, v_cache, dec, AttentionSpec(), attention._Scratch())
    got = cpu.paged_decode(q, k_cache, v_cache, dec.block_tables, dec.context_lens)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_the_backend_uses_the_kernel_only_where_it_applies():
    q, k_cache, v_cache, dec = _case(torch.float32, [20, 9])
    backend = attention.TorchAttentionBackend(cpu_kernels=True)
    calls = []
    real = cpu.paged_decode

    def spy(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cpu, "paged_decode", spy)
        full = backend._decode(q, k_cache, v_cache, dec, AttentionSpec())
        assert len(calls) == 1
        backend._decode(q, k_cache, v_cache, dec, AttentionSpec(kind="moba", moba_block_size=16, moba_topk=2))
        assert len(calls) == 1  # MoBA layers keep their own decode
    want = attention._decode(q, k_cache, v_cache, dec, AttentionSpec(), attention._Scratch())
    torch.testing.assert_close(full, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda a: a.__setitem__("tables", a["tables"].long()), "block_tables must be int32"),
    (lambda a: a.__setitem__("lens", a["lens"] * 100), "outside \\[1,"),
    (lambda a: a["tables"].__setitem__((0, 0), 10_000), "block id 10000 is outside"),
    (lambda a: a.__setitem__("k", a["k"].transpose(0, 1).contiguous().transpose(0, 1)), "must be contiguous"),
    (lambda a: a.__setitem__("q", a["q"].double()), "share a dtype"),
    (lambda a: a.__setitem__("q", a["q"][:, :8]), "do not group"),
])
def test_bad_arguments_are_clear_errors_not_crashes(mutate, message):
    q, k_cache, v_cache, dec = _case(torch.float32, [20, 9])
    args = {"q": q, "k": k_cache, "v": v_cache, "tables": dec.block_tables.clone(), "lens": dec.context_lens.clone()}
    mutate(args)
    with pytest.raises(RuntimeError, match=message):
        cpu.paged_decode(args["q"], args["k"], args["v"], args["tables"], args["lens"])


def _probe(tmp_path, **env) -> list[str]:
    code = "from crescent.kernels import cpu; print(cpu.available()); print(cpu.unavailable_reason())"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "CRESCENT_KERNEL_CACHE": str(tmp_path), **env})
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_without_a_compiler_the_torch_path_stays_and_says_why(tmp_path):
    available, reason = _probe(tmp_path, CXX="/bin/false")
    assert available == "False"
    assert "/bin/false failed" in reason


def test_the_kernels_can_be_turned_off(tmp_path):
    available, reason = _probe(tmp_path, CRESCENT_CPU_KERNELS="0")
    assert available == "False" and "CRESCENT_CPU_KERNELS" in reason
    assert not list(tmp_path.iterdir())  # nothing built
