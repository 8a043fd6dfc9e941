"""Automatic dispatch: the Triton kernels for CUDA tensors when Triton is installed, the torch reference otherwise.

Triton is imported only when a CUDA call needs it, so CPU-only processes never load it.
"""

from __future__ import annotations

import importlib.util

import torch

from crescent.kernels.moba import reference


def triton_available(t: torch.Tensor) -> bool:
    """True when ``t`` lives on a CUDA device and Triton can be imported."""
    return t.device.type == "cuda" and importlib.util.find_spec("triton") is not None


def moba_attn_varlen_auto(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                          block_size: int, topk: int, softmax_scale: float | None = None) -> torch.Tensor:
    """``moba_attn_varlen`` (q [T, H, D], k/v [T, Hkv, D], cu_seqlens int32 [B+1]) on the fastest backend."""
    if triton_available(q):
        from crescent.kernels.moba.prefill_triton import moba_attn_varlen_triton

        return moba_attn_varlen_triton(q, k, v, cu_seqlens.to(torch.int32), block_size, topk, softmax_scale)
    return reference.moba_attn_varlen(q, k, v, cu_seqlens, block_size, topk, softmax_scale)


def moba_attn_prefix_auto(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int, topk: int,
                          softmax_scale: float | None = None) -> torch.Tensor:
    """``moba_attn_prefix`` (q [Tq, H, D] = the last Tq of k/v [Tk, Hkv, D]) on the fastest backend."""
    if triton_available(q):
        from crescent.kernels.moba.prefill_triton import moba_attn_prefix_triton

        return moba_attn_prefix_triton(q, k, v, block_size, topk, softmax_scale)
    return reference.moba_attn_prefix(q, k, v, block_size, topk, softmax_scale)


def moba_decode_paged_auto(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, moba_block_size: int, topk: int,
                           softmax_scale: float | None = None, centroids: torch.Tensor | None = None) -> torch.Tensor:
    """``moba_decode_paged`` on the fastest backend; ``centroids`` (a ``MobaCentroidPool.layer``) is used by the
    Triton path only (the reference computes centroids from the cache)."""
    if triton_available(q):
        from crescent.kernels.moba.decode_triton import moba_decode_paged_triton

        return moba_decode_paged_triton(q, k_cache, v_cache, block_tables.to(torch.int32),
                                        context_lens.to(torch.int32), moba_block_size, topk, softmax_scale,
                                        centroids=centroids)
    return reference.moba_decode_paged(q, k_cache, v_cache, block_tables, context_lens, moba_block_size, topk,
                                       softmax_scale)
