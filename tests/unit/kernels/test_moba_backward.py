"""The MoBA Triton backward against torch autograd through the reference, on CPU under the Triton interpreter.

Interpreter handling: tests/unit/kernels/interpreter.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from crescent.kernels.moba.reference import moba_attn_varlen
from tests.unit.kernels.interpreter import (  # interpreter_env: the autouse fixture
    DEV,
    TRAINING_KERNELS,
    fresh_interpreter_test,
    interpreter_env,  # noqa: F401
    kernels_marker,
    load_kernels,
    rel_err,
)

_MODS = load_kernels(TRAINING_KERNELS)
autograd = _MODS[-1] if _MODS else None
needs_kernels = kernels_marker(_MODS)
test_in_fresh_interpreter = fresh_interpreter_test(_MODS, __file__)


def _inputs(lens: list[int], h: int, hkv: int, d: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    t = sum(lens)
    q, k, v = (torch.randn(t, n, d, generator=g).to(dtype).to(DEV) for n in (h, hkv, hkv))
    grad_out = torch.randn(t, h, d, generator=g).to(dtype).to(DEV)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=DEV)
    return q, k, v, grad_out, cu


def _grads(fn, q, k, v, grad_out, upcast: bool = False):
    """Output and dq, dk, dv of ``fn(q, k, v)`` for the upstream gradient ``grad_out``."""
    leaves = [(x.float() if upcast else x).detach().clone().requires_grad_() for x in (q, k, v)]
    out = fn(*leaves)
    out.backward(grad_out.float() if upcast else grad_out)
    return (out.detach(), *(x.grad for x in leaves))


def _kernel_grads(q, k, v, grad_out, cu, block, topk):
    return _grads(lambda a, b, c: autograd.moba_attn_varlen_trainable(a, b, c, cu, block, topk), q, k, v, grad_out)


def _reference_grads(q, k, v, grad_out, cu, block, topk):
    return _grads(lambda a, b, c: moba_attn_varlen(a, b, c, cu.cpu(), block, topk),
                  *(x.cpu() for x in (q, k, v, grad_out)), upcast=True)


@pytest.fixture
def poison_empty(monkeypatch):
    """Float buffers start as NaN, so a gradient element the kernels never write fails the comparison."""
    real_empty, real_like = torch.empty, torch.empty_like

    def poison(t: torch.Tensor) -> torch.Tensor:
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **kw: poison(real_empty(*a, **kw)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: poison(real_like(*a, **kw)))


CASES = [  # lens, H, Hkv, D, block, topk
    pytest.param([37, 64, 5], 4, 2, 16, 16, 3, id="odd-lens-gqa"),
    pytest.param([12], 2, 2, 16, 16, 3, id="single-block"),
    pytest.param([70], 2, 1, 32, 16, 6, id="topk-ge-blocks"),
    pytest.param([53, 29], 2, 2, 16, 10, 2, id="block-not-pow2"),
    pytest.param([61], 3, 1, 16, 24, 2, id="block-gt-tile-gqa3"),
    pytest.param([45, 9], 2, 2, 16, 8, 1, id="topk1-no-history"),
    pytest.param([0, 33, 0], 2, 2, 16, 16, 2, id="empty-seqs"),
]


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("lens,h,hkv,d,block,topk", CASES)
def test_gradients_match_reference_autograd(lens, h, hkv, d, block, topk, dtype, poison_empty):
    q, k, v, grad_out, cu = _inputs(lens, h, hkv, d, dtype)
    got = _kernel_grads(q, k, v, grad_out, cu, block, topk)
    want = _reference_grads(q, k, v, grad_out, cu, block, topk)
    tol = 2e-5 if dtype == torch.float32 else 5e-3
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        assert a.dtype == dtype and a.shape == b.shape, name
        assert rel_err(a, b, "gradient") < tol, (name, rel_err(a, b, "gradient"))


@needs_kernels
def test_bf16_inputs():
    """bf16 storage (tiles upcast to fp32 in the interpreter): gradients within bf16 rounding of the reference."""
    q, k, v, grad_out, cu = _inputs([40, 27], 4, 2, 16, torch.bfloat16, seed=2)
    got = _kernel_grads(q, k, v, grad_out, cu, 8, 3)
    want = _reference_grads(q, k, v, grad_out, cu, 8, 3)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        assert a.dtype == torch.bfloat16 and rel_err(a, b, "gradient") < 3e-2, name


@needs_kernels
def test_topk_covering_all_blocks_is_causal_attention():
    """With top-k >= the number of blocks every earlier key is selected: the gradient of dense causal attention."""
    lens, h, hkv, block = [50, 23], 4, 2, 8
    q, k, v, grad_out, cu = _inputs(lens, h, hkv, 16, torch.float32, seed=3)
    got = _kernel_grads(q, k, v, grad_out, cu, block, 8)

    def causal(a, b, c):
        outs = []
        for s, e in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
            qs, ks, vs = (x[s:e].transpose(0, 1) for x in (a, b.repeat_interleave(h // hkv, 1),
                                                             c.repeat_interleave(h // hkv, 1)))
            outs.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=True).transpose(0, 1))
        return torch.cat(outs)

    want = _grads(causal, q, k, v, grad_out)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        assert rel_err(a, b, "gradient") < 2e-5, name


@needs_kernels
def test_backward_is_deterministic():
    """No atomics and a stable pair order: two backward passes give bit-identical gradients."""
    q, k, v, grad_out, cu = _inputs([48, 31], 4, 1, 16, torch.float32, seed=4)
    first = _kernel_grads(q, k, v, grad_out, cu, 8, 3)
    second = _kernel_grads(q, k, v, grad_out, cu, 8, 3)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


@needs_kernels
def test_strided_query_view():
    """q as a strided view (last dim contiguous, token stride 2x wider): the launchers pass strides through."""
    _, k, v, grad_out, cu = _inputs([41], 2, 2, 16, torch.float32, seed=5)
    wide = torch.randn(41, 2, 32, device=DEV, requires_grad=True)
    out = autograd.moba_attn_varlen_trainable(wide[..., :16], k, v, cu, 8, 3)
    out.backward(grad_out)
    want = _reference_grads(wide[..., :16].detach(), k, v, grad_out, cu, 8, 3)
    assert rel_err(out, want[0]) < 2e-5
    assert rel_err(wide.grad[..., :16], want[1]) < 2e-5
    assert not wide.grad[..., 16:].any()


@needs_kernels
def test_bad_input_raises_clear_errors():
    q, k, v, _, cu = _inputs([20], 4, 3, 16, torch.float32)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        autograd.moba_attn_varlen_trainable(q, k, v, cu, 8, 2)
    q, k, v, _, cu = _inputs([20], 4, 2, 16, torch.float32)
    with pytest.raises(ValueError, match="as many keys as queries"):
        autograd.moba_attn_varlen_trainable(q, k[:10], v[:10], cu, 8, 2)
    with pytest.raises(ValueError, match="topk"):
        autograd.moba_attn_varlen_trainable(q, k, v, cu, 8, 0)
