"""Helpers shared by the MoBA Triton kernels: launch-time checks and the interpreter switch.

The kernels run compiled on CUDA and under the Triton interpreter (``TRITON_INTERPRET=1``) on CPU tensors. The
interpreter's bf16/fp16 ``tl.dot`` is wrong, so on CPU every tile is upcast to fp32 (the ``UPCAST`` constexpr).
"""

from __future__ import annotations

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def next_pow2(n: int, floor: int = 16) -> int:
    """Smallest power of two >= max(n, floor): Triton tiles need power-of-two sizes, tl.dot needs >= 16."""
    p = floor
    while p < n:
        p *= 2
    return p


def upcast_tiles(t: torch.Tensor) -> bool:
    """True when the kernels run in the interpreter (CPU tensors): tiles must be fp32 there."""
    return t.device.type != "cuda"


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_dims: int) -> tuple[int, int, int]:
    """Validate q [.., H, D] and k/v [.., Hkv, D]; return (H, Hkv, D). Raises ValueError with the fix."""
    if q.dim() != q_dims:
        raise ValueError(f"q must have {q_dims} dims, got shape {tuple(q.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"q/k/v must share one dtype among {SUPPORTED_DTYPES}, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError("q, k and v must be on the same device")
    h, d = q.shape[-2], q.shape[-1]
    hkv = k.shape[-2]
    if k.shape[-1] != d:
        raise ValueError(f"head_dim differs: q has {d}, k has {k.shape[-1]}")
    if hkv == 0 or h % hkv != 0:
        raise ValueError(f"query heads ({h}) must be a multiple of KV heads ({hkv})")
    if d < 16 or d & (d - 1):
        raise ValueError(f"head_dim must be a power of two >= 16 for the Triton kernels, got {d}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last (head_dim) dimension")
    return h, hkv, d


def check_routing(block_size: int, topk: int) -> None:
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if topk < 1:
        raise ValueError(f"topk counts the own block and must be >= 1, got {topk}")
