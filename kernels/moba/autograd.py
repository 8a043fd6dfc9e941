"""Trainable exact MoBA: the Triton varlen prefill forward with the Triton backward (backward_triton.py).

The routing (centroids, top-k) is a hard choice made in the forward and reused by the backward, exactly as the
reference's ``_history_mask`` runs under ``no_grad``: no gradient reaches the keys through the centroids.
"""

from __future__ import annotations

import torch

from crescent.kernels.moba.backward_triton import moba_varlen_backward
from crescent.kernels.moba.prefill_triton import VarlenPlan, make_plan, varlen_forward
from crescent.kernels.moba.triton_common import check_qkv, check_routing


class MobaVarlenFunction(torch.autograd.Function):
    """autograd glue: forward keeps (q, k, v, out, lse, routing); backward recomputes P from the LSE."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                block_size: int, topk: int, softmax_scale: float | None, max_seqlen: int | None) -> torch.Tensor:
        check_qkv(q, k, v, 3)
        check_routing(block_size, topk)
        if k.shape[0] != q.shape[0]:
            raise ValueError(f"self-attention needs as many keys as queries, got {k.shape[0]} and {q.shape[0]}")
        plan = make_plan(cu_seqlens, cu_seqlens, block_size, q.shape[0], k.shape[0], max_seqlen, max_seqlen)
        state = varlen_forward(q, k, v, plan, block_size, topk, softmax_scale, store_lse=True)
        ctx.save_for_backward(q, k, v, state.out, state.lse, state.sel, state.blk_tok, plan.cu_q, plan.cu_nb)
        ctx.layout = (plan.nb_cap, plan.max_lq, plan.max_lk, block_size, topk, softmax_scale)
        return state.out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        q, k, v, out, lse, sel, blk_tok, cu, cu_nb = ctx.saved_tensors
        nb_cap, max_lq, max_lk, block_size, topk, softmax_scale = ctx.layout
        plan = VarlenPlan(cu, cu, cu_nb, nb_cap, max_lq, max_lk)
        dq, dk, dv = moba_varlen_backward(grad_out, q, k, v, out, lse, sel, blk_tok, plan, block_size, topk,
                                          softmax_scale)
        return dq, dk, dv, None, None, None, None, None


def moba_attn_varlen_trainable(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                               block_size: int, topk: int, softmax_scale: float | None = None,
                               max_seqlen: int | None = None) -> torch.Tensor:
    """Exact MoBA causal self-attention over a packed batch, differentiable in q, k and v.

    q [T, H, D]; k, v [T, Hkv, D] (H a multiple of Hkv; D a power of two >= 16); cu_seqlens int32 [B+1];
    fp32, fp16 or bf16 on CUDA (or CPU under TRITON_INTERPRET=1). Returns [T, H, D] in q's dtype; the same
    values as ``moba_attn_varlen_triton``. Pass max_seqlen to skip reading cu_seqlens back to the host.
    """
    return MobaVarlenFunction.apply(q, k, v, cu_seqlens, block_size, topk, softmax_scale, max_seqlen)
