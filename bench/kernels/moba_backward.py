"""Trainable exact MoBA (Triton forward + backward) against dense causal flash SDPA forward + backward, one GPU run.

    python -m bench.kernels.moba_backward [--seqlens 8192 32768] [--commit SHA]

Times forward+backward and backward alone (backward = fwd+bwd minus the forward of the same call) for bf16,
H=16, D=128, batch 1, and reports the speedup over dense next to the ideal (causal keys / routed keys), plus the
gradients' relative error against dense causal attention in a top-k that covers every block (a correctness
check measured in the same run). Writes bench/results/moba_backward.json and .png.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from bench.kernels.moba_prefill import ideal_speedup
from bench.kernels.timing import time_ms
from bench.results_io import new_run_id, write_result
from crescent.kernels.moba.autograd import moba_attn_varlen_trainable

H, D = 16, 128
MOBA = [(512, 3), (4096, 3)]


def _leaves(s: int, seed: int):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v, do = (torch.randn(s, H, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(4))
    return [x.requires_grad_() for x in (q, k, v)], do


def _dense(q, k, v):
    return F.scaled_dot_product_attention(*(x.transpose(0, 1)[None] for x in (q, k, v)), is_causal=True)[0] \
        .transpose(0, 1)


def _fwd_bwd(fn, leaves, do):
    def step():
        for x in leaves:
            x.grad = None
        fn(*leaves).backward(do)
    return step


def _grads(fn, leaves, do) -> list[torch.Tensor]:
    _fwd_bwd(fn, leaves, do)()
    return [x.grad.clone() for x in leaves]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def gradient_check(s: int = 4096, block: int = 512) -> dict:
    """MoBA with top-k >= blocks is causal attention: its gradients against flash SDPA's, same bf16 inputs."""
    leaves, do = _leaves(s, 7)
    cu = torch.tensor([0, s], dtype=torch.int32, device="cuda")
    moba = _grads(lambda q, k, v: moba_attn_varlen_trainable(q, k, v, cu, block, s // block + 1, max_seqlen=s),
                  leaves, do)
    dense = _grads(_dense, leaves, do)
    return {f"rel_err_{n}_vs_dense": _rel(a, b) for n, a, b in zip(("dq", "dk", "dv"), moba, dense, strict=True)}


def run_config(s: int, block: int, topk: int) -> dict:
    leaves, do = _leaves(s, s + block + topk)
    cu = torch.tensor([0, s], dtype=torch.int32, device="cuda")
    moba = lambda q, k, v: moba_attn_varlen_trainable(q, k, v, cu, block, topk, max_seqlen=s)  # noqa: E731
    row = {"seqlen": s, "block": block, "topk": topk, "ideal_speedup": ideal_speedup(s, block, topk)}
    with torch.no_grad():
        row["dense_fwd_ms"] = time_ms(lambda: _dense(*leaves))
        row["moba_fwd_ms"] = time_ms(lambda: moba(*leaves))
    row["dense_fwd_bwd_ms"] = time_ms(_fwd_bwd(_dense, leaves, do))
    row["moba_fwd_bwd_ms"] = time_ms(_fwd_bwd(moba, leaves, do))
    row["dense_bwd_ms"] = row["dense_fwd_bwd_ms"] - row["dense_fwd_ms"]
    row["moba_bwd_ms"] = row["moba_fwd_bwd_ms"] - row["moba_fwd_ms"]
    row["speedup_fwd_bwd_vs_dense"] = row["dense_fwd_bwd_ms"] / row["moba_fwd_bwd_ms"]
    row["speedup_bwd_vs_dense"] = row["dense_bwd_ms"] / max(row["moba_bwd_ms"], 1e-6)
    row["fraction_of_ideal_fwd_bwd"] = row["speedup_fwd_bwd_vs_dense"] / row["ideal_speedup"]
    print({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
    return row


def plot(rows):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['seqlen'] // 1024}K/{r['block']}/{r['topk']}" for r in rows]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, (key, name) in enumerate([("dense_fwd_bwd_ms", "dense SDPA fwd+bwd"),
                                     ("moba_fwd_bwd_ms", "MoBA Triton fwd+bwd (exact)")]):
        a1.bar([j + (i - 0.5) * 0.4 for j in range(len(rows))], [r[key] for r in rows], 0.4, label=name)
    a1.set_yscale("log")
    a1.set_ylabel("ms (median)")
    a1.set_xticks(range(len(rows)), labels, rotation=45)
    a1.legend(fontsize=8)
    a2.bar([j - 0.2 for j in range(len(rows))], [r["speedup_fwd_bwd_vs_dense"] for r in rows], 0.4,
           label="MoBA fwd+bwd")
    a2.bar([j + 0.2 for j in range(len(rows))], [r["ideal_speedup"] for r in rows], 0.4, label="ideal")
    a2.set_ylabel("speedup over dense causal")
    a2.set_xticks(range(len(rows)), labels, rotation=45)
    a2.legend(fontsize=8)
    fig.suptitle(f"Trainable MoBA, H={H} D={D} bf16 batch 1, {torch.cuda.get_device_name(0)}")
    plt.close("all")
    return fig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqlens", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--commit", default=None, help="the commit to record, \"<sha>\" or \"<sha>+dirty\" (the GPU machine's tree has no .git)")
    args = ap.parse_args()
    config = {"H": H, "Hkv": H, "D": D, "dtype": "bfloat16", "batch": 1, "seqlens": args.seqlens, "moba": MOBA,
              "timing": "median of CUDA-event timed calls after a warm-up; bwd = fwd+bwd - fwd"}
    check = gradient_check()
    print(check, flush=True)
    rows, run_id, total = [], new_run_id(), len(args.seqlens) * len(MOBA)
    for s in args.seqlens:
        for block, topk in MOBA:
            rows.append(run_config(s, block, topk))
            torch.cuda.empty_cache()
            write_result("moba_backward", config, {"gradient_check": check, "rows": rows}, plot(rows),
                         commit=args.commit, run_id=run_id, partial=len(rows) < total)


if __name__ == "__main__":
    main()
