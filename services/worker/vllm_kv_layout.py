"""Moving KV between vLLM's paged per-layer caches and crescent's store blocks (torch only, no vLLM import).

vLLM's CPU attention backend (``CPU_ATTN``) allocates each layer as ``[num_pages, num_kv_heads, page_size,
2 * head_dim]``, but that shape is only a size: its cache-write kernel places a page's keys and values in an order
of its own, chosen per ISA (on AVX2, ``vec``: values token-major ``[heads, page_size, head_dim]``, keys transposed
``[heads, head_dim, page_size]`` for the dot products). Reading a token's KV by its slot therefore needs the
kernel's order, so it is measured, not assumed: ``probe_page_layout`` lets the kernel write numbered tokens into
one scratch page and records where each (token, head, dim) of the keys and of the values lands (``PageLayout``).
Any fixed per-page order works, whatever the ISA or dtype.

A store block is crescent's engine block, ``[num_layers, 2, block_size, num_kv_heads, head_dim]`` in the model's
dtype (services/worker/kv_transfer.py), so the bytes of a vLLM worker and of a crescent worker agree when the
model, dtype and block size do.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

_LAYER_INDEX = re.compile(r"\.(\d+)\.")
_DIGIT = 256  # digits 1..256 are exact in every float dtype the kernels store (bf16 included)
_DIGITS = 3  # up to 256**3 elements per page

# write(key [n, H, D], value [n, H, D], page [1, H, page_size, 2 * D], slots [n]): the backend's cache write
PageWriter = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]


def layer_order(names: list[str]) -> list[str]:
    """Attention layer names in model order ("model.layers.3.self_attn.attn" -> 3)."""

    def index(name: str) -> int:
        found = _LAYER_INDEX.findall(f".{name}.")
        if not found:
            raise ValueError(f"cannot tell the layer index of KV cache {name!r}")
        return int(found[-1])

    return sorted(names, key=index)


@dataclass(frozen=True)
class PageLayout:
    """Where the key and the value of (token offset, head, dim) sit among a page's elements."""

    key_pos: torch.Tensor  # [page_size, heads, head_dim], int64 offsets into the flat page
    value_pos: torch.Tensor

    @property
    def page_size(self) -> int:
        return self.key_pos.shape[0]


def check_paged_layer(layer: torch.Tensor) -> tuple[int, int, int]:
    """(num_kv_heads, page_size, head_dim) of a CPU-backend layer cache; ValueError for any other layout."""
    if layer.dim() != 4 or layer.shape[-1] % 2 or not layer.is_contiguous():
        raise ValueError(f"CrescentConnector reads vLLM's CPU attention caches, contiguous [num_pages, "
                         f"num_kv_heads, page_size, 2 * head_dim]; got a KV cache of shape {tuple(layer.shape)} "
                         f"(another attention backend, whose layout is not supported yet)")
    return layer.shape[1], layer.shape[2], layer.shape[3] // 2


def probe_page_layout(write: PageWriter, heads: int, page_size: int, head_dim: int,
                      dtype: torch.dtype) -> PageLayout:
    """Measure the cache-write kernel's order: write element numbers, one base-256 digit per pass."""
    n = page_size * heads * head_dim
    if n > _DIGIT ** _DIGITS:
        raise ValueError(f"a page of {n} elements is too large to probe")
    element = torch.arange(n)
    slots = torch.arange(page_size)
    found = {}
    for part in ("key", "value"):
        code = torch.zeros(2 * n, dtype=torch.long)
        written = None
        for d in range(_DIGITS):
            digit = ((element // _DIGIT ** d) % _DIGIT + 1).to(dtype).view(page_size, heads, head_dim)
            zero = torch.zeros_like(digit)
            page = torch.zeros(1, heads, page_size, 2 * head_dim, dtype=dtype)
            write(digit if part == "key" else zero, zero if part == "key" else digit, page, slots)
            flat = page.reshape(-1)
            here = flat != 0
            if written is None:
                written = here
            elif not torch.equal(written, here):
                raise ValueError("the KV cache kernel does not write a fixed place per element; cannot map it")
            code[here] += (flat[here].to(torch.long) - 1) * _DIGIT ** d
        positions = written.nonzero().flatten()
        if positions.numel() != n:
            raise ValueError(f"the KV cache kernel wrote {positions.numel()} {part} elements for {n}")
        pos = torch.full((n,), -1, dtype=torch.long)
        pos[code[positions]] = positions
        if (pos < 0).any():
            raise ValueError(f"the KV cache kernel's {part} order is not a permutation; cannot map it")
        found[part] = pos.view(page_size, heads, head_dim)
    return PageLayout(found["key"], found["value"])


def _index(layout: PageLayout, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    pages, offsets = slots // layout.page_size, slots % layout.page_size
    return pages[:, None, None], layout.key_pos[offsets], layout.value_pos[offsets]


def gather_tokens(layers: list[torch.Tensor], layout: PageLayout, slots: torch.Tensor) -> torch.Tensor:
    """KV of the tokens in ``slots`` from every layer: ``[num_layers, n, 2, num_kv_heads, head_dim]``."""
    pages, k, v = _index(layout, slots)
    out = []
    for layer in layers:
        flat = layer.view(layer.shape[0], -1)
        out.append(torch.stack([flat[pages, k], flat[pages, v]], dim=1))
    return torch.stack(out)


def scatter_tokens(layers: list[torch.Tensor], layout: PageLayout, slots: torch.Tensor, kv: torch.Tensor) -> None:
    """Write ``kv`` (``[num_layers, n, 2, num_kv_heads, head_dim]``) into the tokens' slots of every layer."""
    if kv.shape[0] != len(layers) or kv.shape[1] != slots.numel():
        raise ValueError(f"KV of shape {tuple(kv.shape)} does not fit {len(layers)} layers x {slots.numel()} slots")
    pages, k, v = _index(layout, slots)
    for layer, layer_kv in zip(layers, kv, strict=True):
        flat = layer.view(layer.shape[0], -1)
        flat[pages, k] = layer_kv[:, 0].to(layer.dtype)
        flat[pages, v] = layer_kv[:, 1].to(layer.dtype)


def to_store_blocks(kv: torch.Tensor, block_size: int) -> torch.Tensor:
    """``[L, n, 2, H, D]`` (n a multiple of block_size) -> contiguous store blocks ``[n / bs, L, 2, bs, H, D]``."""
    layers, n, two, heads, dim = kv.shape
    if n % block_size:
        raise ValueError(f"{n} tokens are not whole blocks of {block_size}")
    blocks = kv.reshape(layers, n // block_size, block_size, two, heads, dim)
    return blocks.permute(1, 0, 3, 2, 4, 5).contiguous()


def from_store_blocks(blocks: torch.Tensor) -> torch.Tensor:
    """Store blocks ``[nb, L, 2, bs, H, D]`` -> token KV ``[L, nb * bs, 2, H, D]``."""
    nb, layers, two, bs, heads, dim = blocks.shape
    return blocks.permute(1, 0, 3, 2, 4, 5).reshape(layers, nb * bs, two, heads, dim)
