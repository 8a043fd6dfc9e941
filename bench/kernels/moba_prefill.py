"""Exact MoBA prefill (Triton) against dense causal flash SDPA and FlexAttention, in one run on one GPU.

    python -m bench.kernels.moba_prefill [--seqlens 8192 32768 131072] [--commit SHA]

Baselines: dense causal SDPA (flash); FlexAttention with the exact per-token MoBA mask (block mask built from the
same routing, full tiles marked full); FlexAttention with one selection per 128-query tile (NOT exact: the tile's
mean query routes for all of it). The ideal speedup is causal keys / routed keys.
Writes bench/results/moba_prefill.json and .png.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from bench.kernels.timing import time_ms
from bench.results_io import new_run_id, write_result
from crescent.kernels.moba.prefill_triton import make_plan, moba_attn_varlen_triton
from crescent.kernels.moba.routing_triton import block_centroids, route_prefill

H, D, TILE = 16, 128, 128
MOBA = [(512, 3), (4096, 3), (4096, 12)]


def ideal_speedup(s: int, block: int, topk: int) -> float:
    pos = torch.arange(s, dtype=torch.float64)
    routed = (pos % block + 1) + torch.clamp(pos // block, max=topk - 1) * block
    return float((pos + 1).sum() / routed.sum())


def _tile_masks(any_sel, all_sel, s, block, device):
    """Per (head, q tile, kv tile) partial/full flags -> a Flex BlockMask's kv lists."""
    n_t = s // TILE
    blk_of_kt = torch.arange(n_t, device=device) * TILE // block
    qt = torch.arange(n_t, device=device)
    same = (qt * TILE // block)[:, None] == blk_of_kt[None, :]
    own_full = same & (qt[None, :] < qt[:, None])
    own_part = same & (qt[None, :] == qt[:, None])
    full = all_sel[..., blk_of_kt] | own_full
    part = (any_sel[..., blk_of_kt] | own_part) & ~full

    def lists(m):
        return m.sum(-1).to(torch.int32)[None], torch.argsort(m.to(torch.int8), dim=-1, descending=True,
                                                              stable=True).to(torch.int32)[None]
    return lists(part), lists(full)


def flex_masks(q, sel, cen, s, block, topk):
    from torch.nn.attention.flex_attention import BlockMask

    nb, dev = s // block, q.device
    idx = torch.where(sel >= 0, sel, nb).long().permute(1, 0, 2)  # [H, S, K1]
    bits = torch.zeros(H, s, nb + 1, dtype=torch.bool, device=dev).scatter_(2, idx, True)[..., :nb].contiguous()
    tiles = bits.view(H, s // TILE, TILE, nb)
    (kn, ki), (fn, fi) = _tile_masks(tiles.any(2), tiles.all(2), s, block, dev)

    def exact_mod(b, h, q_idx, kv_idx):
        kb = kv_idx // block
        return ((q_idx // block == kb) & (kv_idx <= q_idx)) | bits[h, q_idx, kb]

    exact = BlockMask.from_kv_blocks(kn, ki, fn, fi, BLOCK_SIZE=TILE, mask_mod=exact_mod, seq_lengths=(s, s))
    # Not exact: the mean query of each 128-query tile routes for the whole tile.
    qmean = q.float().view(s // TILE, TILE, H, D).mean(1)
    gate = torch.einsum("thd,nhd->htn", qmean, cen)
    tile_blk = torch.arange(s // TILE, device=dev) * TILE // block
    gate = gate.masked_fill(torch.arange(nb, device=dev)[None, None, :] >= tile_blk[None, :, None], float("-inf"))
    tbits = torch.zeros_like(gate, dtype=torch.bool)
    if topk > 1 and nb > 0:
        top = gate.topk(min(topk - 1, nb), -1)
        tbits.scatter_(-1, top.indices, top.values > float("-inf"))
    (kn2, ki2), (fn2, fi2) = _tile_masks(tbits, tbits, s, block, dev)

    def tile_mod(b, h, q_idx, kv_idx):
        kb = kv_idx // block
        return ((q_idx // block == kb) & (kv_idx <= q_idx)) | tbits[h, q_idx // TILE, kb]

    tiled = BlockMask.from_kv_blocks(kn2, ki2, fn2, fi2, BLOCK_SIZE=TILE, mask_mod=tile_mod, seq_lengths=(s, s))
    density = float(bits.float().mean()) if nb else 0.0
    return exact, tiled, density


def run_config(s: int, block: int, topk: int, flex, no_flex: bool) -> dict:
    g = torch.Generator(device="cuda").manual_seed(s + block + topk)
    q, k, v = (torch.randn(s, H, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    cu = torch.tensor([0, s], dtype=torch.int32, device="cuda")
    qt, kt, vt = (x.transpose(0, 1)[None] for x in (q, k, v))
    row = {"seqlen": s, "block": block, "topk": topk, "ideal_speedup": ideal_speedup(s, block, topk)}
    row["dense_ms"] = time_ms(lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True))
    moba = lambda: moba_attn_varlen_triton(q, k, v, cu, block, topk, max_seqlen=s)  # noqa: E731
    out = moba()
    row["moba_triton_ms"] = time_ms(moba)
    if not no_flex:
        plan = make_plan(cu, cu, block, s, s, s, s)
        cen, _ = block_centroids(k, plan.cu_k, plan.cu_nb, plan.nb_cap, plan.max_lk, block)
        sel = route_prefill(q, cen, plan.cu_q, plan.cu_k, plan.cu_nb, plan.max_lq, block, topk)
        exact, tiled, row["routed_block_density"] = flex_masks(q, sel, cen, s, block, topk)
        ref = flex(qt, kt, vt, block_mask=exact)[0].transpose(0, 1)
        row["rel_err_vs_flex_exact"] = float((out.float() - ref.float()).norm() / ref.float().norm())
        row["flex_exact_ms"] = time_ms(lambda: flex(qt, kt, vt, block_mask=exact))
        row["flex_tile_not_exact_ms"] = time_ms(lambda: flex(qt, kt, vt, block_mask=tiled))
        row["speedup_vs_flex_exact"] = row["flex_exact_ms"] / row["moba_triton_ms"]
        del exact, tiled, sel, cen, ref
    row["speedup_vs_dense"] = row["dense_ms"] / row["moba_triton_ms"]
    row["fraction_of_ideal"] = row["speedup_vs_dense"] / row["ideal_speedup"]
    print({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
    return row


def plot(rows):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['seqlen'] // 1024}K/{r['block']}/{r['topk']}" for r in rows]
    series = [("dense_ms", "dense SDPA"), ("flex_exact_ms", "Flex exact"),
              ("flex_tile_not_exact_ms", "Flex per-tile (not exact)"), ("moba_triton_ms", "MoBA Triton (exact)")]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(14, 4.5))
    w = 0.2
    for i, (key, name) in enumerate(series):
        xs = [j + (i - 1.5) * w for j in range(len(rows))]
        a1.bar(xs, [r.get(key, 0) for r in rows], w, label=name)
    a1.set_yscale("log")
    a1.set_ylabel("ms (median)")
    a1.set_xticks(range(len(rows)), labels, rotation=45)
    a1.legend(fontsize=8)
    a2.bar([j - 0.2 for j in range(len(rows))], [r["speedup_vs_dense"] for r in rows], 0.4, label="MoBA Triton")
    a2.bar([j + 0.2 for j in range(len(rows))], [r["ideal_speedup"] for r in rows], 0.4, label="ideal")
    a2.set_ylabel("speedup over dense causal")
    a2.set_xticks(range(len(rows)), labels, rotation=45)
    a2.legend(fontsize=8)
    fig.suptitle(f"MoBA prefill, H={H} D={D} bf16 batch 1, {torch.cuda.get_device_name(0)}")
    plt.close("all")
    return fig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqlens", type=int, nargs="+", default=[8192, 32768, 131072])
    ap.add_argument("--no-flex", action="store_true", help="skip the FlexAttention baselines (no compile)")
    ap.add_argument("--commit", default=None, help="the commit to record, \"<sha>\" or \"<sha>+dirty\" (the GPU machine's tree has no .git)")
    args = ap.parse_args()
    import torch._dynamo
    from torch.nn.attention.flex_attention import flex_attention

    torch._dynamo.config.cache_size_limit = 256
    if hasattr(torch._dynamo.config, "recompile_limit"):
        torch._dynamo.config.recompile_limit = 256
    flex = torch.compile(flex_attention, dynamic=False)
    config = {"H": H, "Hkv": H, "D": D, "dtype": "bfloat16", "batch": 1, "seqlens": args.seqlens,
              "moba": MOBA, "timing": "median of CUDA-event timed calls after a warm-up"}
    rows, run_id, total = [], new_run_id(), len(args.seqlens) * len(MOBA)
    for s in args.seqlens:
        for block, topk in MOBA:
            rows.append(run_config(s, block, topk, flex, args.no_flex))
            torch.cuda.empty_cache()
            # Saved after every config, so a run cut short still leaves its numbers (as a partial run).
            write_result("moba_prefill", config, {"rows": rows}, plot(rows), commit=args.commit, run_id=run_id,
                         partial=len(rows) < total)


if __name__ == "__main__":
    main()
