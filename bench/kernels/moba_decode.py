"""Exact MoBA paged decode (Triton) against dense SDPA decode over the same context, in one run on one GPU.

    python -m bench.kernels.moba_decode [--contexts 8192 32768 131072] [--batches 1 16] [--commit SHA]

One new token per sequence, H = Hkv = 16, D = 128, bf16, page size 16. The cache pages are laid out in order so
that dense SDPA reads the very same memory as a strided [B, H, S, D] view (no extra copy favours either side).
MoBA routes on a prebuilt centroid pool (what the engine keeps), so the timed call is routing + attention + merge.
The ideal speedup is context keys / keys in the selected blocks. Writes bench/results/moba_decode.json and .png.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from bench.kernels.timing import time_ms
from bench.results_io import write_result
from crescent.kernels.moba.decode_triton import MobaCentroidPool, moba_decode_paged_triton

H, D, PAGE = 16, 128, 16
MOBA = [(512, 3), (4096, 3), (4096, 12)]


def cuda_graph(fn):
    """fn captured in a CUDA graph (as a serving engine runs decode): replays cost no Python launch overhead."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def ideal_speedup(ctx: int, block: int, topk: int) -> float:
    own = (ctx - 1) // block
    return ctx / ((ctx - own * block) + min(topk - 1, own) * block)


def run_context(ctx: int, batch: int) -> list[dict]:
    g = torch.Generator(device="cuda").manual_seed(ctx + batch)
    pages = batch * ctx // PAGE
    kc = torch.randn(pages, PAGE, H, D, device="cuda", dtype=torch.bfloat16, generator=g)
    vc = torch.randn(pages, PAGE, H, D, device="cuda", dtype=torch.bfloat16, generator=g)
    q = torch.randn(batch, H, D, device="cuda", dtype=torch.bfloat16, generator=g)
    bt = torch.arange(pages, dtype=torch.int32, device="cuda").view(batch, ctx // PAGE)
    lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    kd, vd = (c.view(batch, ctx, H, D).transpose(1, 2) for c in (kc, vc))
    qd = q[:, :, None]
    dense = lambda: F.scaled_dot_product_attention(qd, kd, vd)  # noqa: E731
    dense_ms, dense_graph_ms = time_ms(dense), time_ms(cuda_graph(dense))
    rows = []
    for block, topk in MOBA:
        pool = MobaCentroidPool(1, pages, H, D, PAGE, block, "cuda")
        pool.update(0, kc, bt.tolist(), [0] * batch, [ctx] * batch)
        cen = pool.layer(0)
        out = moba_decode_paged_triton(q, kc, vc, bt, lens, block, topk, centroids=cen)
        moba = lambda: moba_decode_paged_triton(q, kc, vc, bt, lens, block, topk, centroids=cen)  # noqa: B023, E731
        t, t_graph = time_ms(moba), time_ms(cuda_graph(moba))
        row = {"context": ctx, "batch": batch, "block": block, "topk": topk, "dense_sdpa_us": dense_ms * 1e3,
               "moba_triton_us": t * 1e3, "speedup_vs_dense": dense_ms / t,
               "dense_sdpa_graph_us": dense_graph_ms * 1e3, "moba_triton_graph_us": t_graph * 1e3,
               "speedup_vs_dense_graph": dense_graph_ms / t_graph,
               "ideal_speedup": ideal_speedup(ctx, block, topk), "finite": bool(torch.isfinite(out).all())}
        print({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
        rows.append(row)
    return rows


def plot(rows, batches):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(batches), figsize=(6 * len(batches), 4.2), squeeze=False)
    for ax, b in zip(axes[0], batches, strict=True):
        sub = [r for r in rows if r["batch"] == b]
        ctxs = sorted({r["context"] for r in sub})
        for key, style, name in (("dense_sdpa_us", "k-o", "dense SDPA"), ("dense_sdpa_graph_us", "k--o", "dense, graph")):
            ax.plot(ctxs, [next(r[key] for r in sub if r["context"] == c) for c in ctxs], style, label=name)
        for block, topk in MOBA:
            for key, style, tag in (("moba_triton_us", "-o", ""), ("moba_triton_graph_us", "--o", ", graph")):
                ax.plot(ctxs, [next(r[key] for r in sub if r["context"] == c and r["block"] == block
                                    and r["topk"] == topk) for c in ctxs], style, label=f"MoBA {block}/{topk}{tag}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context tokens")
        ax.set_ylabel("us per decode step (median)")
        ax.set_title(f"batch {b}")
        ax.legend(fontsize=8)
    fig.suptitle(f"MoBA paged decode, H={H} D={D} bf16, page {PAGE}, {torch.cuda.get_device_name(0)}")
    return fig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768, 131072])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--commit", default=None, help="the commit to record, \"<sha>\" or \"<sha>+dirty\" (the GPU machine's tree has no .git)")
    args = ap.parse_args()
    rows = []
    for b in args.batches:
        for c in args.contexts:
            rows += run_context(c, b)
            torch.cuda.empty_cache()
    config = {"H": H, "Hkv": H, "D": D, "dtype": "bfloat16", "page_size": PAGE, "contexts": args.contexts,
              "batches": args.batches, "moba": MOBA, "timing": "median of CUDA-event timed calls after a warm-up; *_graph_us: CUDA-graph replays"}
    write_result("moba_decode", config, {"rows": rows}, plot(rows, args.batches), commit=args.commit)


if __name__ == "__main__":
    main()
