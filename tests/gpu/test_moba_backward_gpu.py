"""The MoBA Triton backward compiled on a CUDA GPU: bf16, head_dim 128, against autograd through the reference.

The kernel modules are imported inside the fixture (see test_moba_triton_gpu.py for why).
"""

from __future__ import annotations

import pytest
import torch

from crescent.kernels.moba.reference import moba_attn_varlen

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def trainable():
    from crescent.kernels.moba.autograd import moba_attn_varlen_trainable

    return moba_attn_varlen_trainable


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert not torch.isnan(a).any()
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def _grads(fn, leaves, grad_out):
    leaves = [x.detach().clone().requires_grad_() for x in leaves]
    out = fn(*leaves)
    out.backward(grad_out)
    return (out.detach(), *(x.grad for x in leaves))


def _case(lens, h, hkv, d, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    t = sum(lens)
    q, k, v = (torch.randn(t, n, d, device="cuda", generator=g, dtype=dtype) for n in (h, hkv, hkv))
    grad_out = torch.randn(t, h, d, device="cuda", generator=g, dtype=dtype)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    return q, k, v, grad_out, cu


@pytest.mark.parametrize("lens,h,hkv,block,topk", [
    ([1000, 3000, 517], 8, 2, 256, 3),
    ([2048], 16, 16, 512, 3),
    ([2500, 700], 4, 4, 128, 12),
    ([777, 1500], 8, 1, 32, 4),
], ids=["varlen-gqa-b256", "mha-b512", "topk12-b128", "mqa-b32-training"])
def test_gradients_bf16(trainable, lens, h, hkv, block, topk):
    q, k, v, grad_out, cu = _case(lens, h, hkv, 128, torch.bfloat16, seed=1)
    got = _grads(lambda a, b, c: trainable(a, b, c, cu, block, topk), (q, k, v), grad_out)
    want = _grads(lambda a, b, c: moba_attn_varlen(a, b, c, cu, block, topk), (q.float(), k.float(), v.float()),
                  grad_out.float())
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        assert a.dtype == torch.bfloat16 and _rel_err(a, b) < 2e-2, name


def test_gradients_fp32_and_deterministic(trainable):
    q, k, v, grad_out, cu = _case([1200, 333], 4, 2, 64, torch.float32, seed=2)
    run = lambda: _grads(lambda a, b, c: trainable(a, b, c, cu, 128, 4), (q, k, v), grad_out)  # noqa: E731
    got, again = run(), run()
    want = _grads(lambda a, b, c: moba_attn_varlen(a, b, c, cu, 128, 4), (q, k, v), grad_out)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        assert _rel_err(a, b) < 5e-3, name  # tf32 dots on the GPU
    assert all(torch.equal(a, b) for a, b in zip(got, again, strict=True))
