"""Tile-size sweep for the MoBA prefill kernels (prints a table; the chosen tiles go into prefill_triton._tiles).

    python -m bench.kernels.moba_tune [--shapes 32768:512:3 131072:4096:3]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from bench.kernels.timing import time_ms
from crescent.kernels.moba.prefill_triton import moba_attn_varlen_qk_triton

H, D = 16, 128
_BASE = dict(route_bm=64, hist_bm=64, hist_bn=64, own_bm=64, own_bn=64, warps=4, stages=3)
CANDIDATES = [  # routing rows, history tile, own tile, warps per kernel, stages
    _BASE,
    {**_BASE, "own_bm": 128, "own_warps": 8},
    {**_BASE, "hist_bm": 128, "hist_warps": 8},
    {**_BASE, "hist_bm": 128, "hist_warps": 8, "own_bm": 128, "own_warps": 8},
    {**_BASE, "route_bm": 32, "hist_bn": 128},
]


def profile(fn) -> None:
    """Per-kernel GPU time of one call (routing, schedule ops, history, own+merge)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    fn()
    torch.cuda.synchronize()
    with prof(activities=[ProfilerActivity.CUDA]) as p:
        fn()
        torch.cuda.synchronize()
    print(p.key_averages().table(sort_by="cuda_time_total", row_limit=6), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="+", default=["32768:512:3", "131072:4096:3", "8192:4096:3"])
    args = ap.parse_args()
    for shape in args.shapes:
        run_shape(*(int(x) for x in shape.split(":")))
        torch.cuda.empty_cache()


def run_shape(s: int, block: int, topk: int) -> None:
    q, k, v = (torch.randn(s, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    cu = torch.tensor([0, s], dtype=torch.int32, device="cuda")
    qt, kt, vt = (x.transpose(0, 1)[None] for x in (q, k, v))
    dense = time_ms(lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True))
    base = None
    for tiles in CANDIDATES:
        fn = lambda: moba_attn_varlen_qk_triton(q, k, v, cu, cu, block, topk, None, s, s, tiles)  # noqa: B023, E731
        out = fn()
        base = out if base is None else base
        err = float((out.float() - base.float()).norm() / base.float().norm())
        t = time_ms(fn)
        print(f"{s}:{block}:{topk} {str(tiles):>90} {t:9.3f} ms  dense {dense:8.3f} ms  x{dense / t:5.2f}  "
              f"diff-vs-first {err:.1e}", flush=True)
    fn = lambda: moba_attn_varlen_qk_triton(q, k, v, cu, cu, block, topk, None, s, s)  # noqa: E731
    host = []
    for _ in range(5):  # host time to enqueue one call (no sync inside): the floor for small shapes
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        host.append((time.perf_counter() - t0) * 1e3)
    torch.cuda.synchronize()
    print(f"{s}:{block}:{topk} host enqueue ms per call: {sorted(host)[2]:.3f}", flush=True)
    profile(fn)

if __name__ == "__main__":
    main()
