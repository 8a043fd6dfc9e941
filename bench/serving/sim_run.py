"""Run the simulator on the conversation trace: every policy x rejection mode, a load sweep, the goal checks.

    .venv/bin/python -m bench.serving.sim_run [--duration-s 600] [--quick]

Writes bench/results/serving_sim.json and .png (about 1-2 minutes; each simulation of the 600 s slice takes a
few seconds). Cluster, SLOs and cost model are in the JSON's config; the cost
model is an arithmetic estimate for LLaMA2-70B on 8 GPUs per instance (cost_model.CostModel defaults), not a
measurement. Goals checked (ARCHITECTURE.md / issue 7): mooncake serves >= 2x the requests of round_robin within
SLO; ``predicted`` rejects >= 10% fewer than ``load`` at equal or better SLO attainment, and cuts wasted prefill
>= 50% vs ``none``.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

from bench.serving.sim import SimConfig, simulate
from bench.serving.sim_metrics import ideal_hit_rate, summarize
from bench.serving.trace import DEFAULT_TRACE, load_trace

POLICIES = ("round_robin", "least_loaded", "cache_aware", "mooncake")
REJECTIONS = ("none", "load", "predicted")
# A stresses prefill (8 prefill, 4 decode instances); B stresses decode (8 prefill, 1 decode); C is A without a
# shared KV store (prefix reuse only from a prefill instance's own cache), where placement decides the hit rate.
SCENARIOS = {
    "A_prefill_bound": dict(n_prefill=8, n_decode=4, speedup=1.5),
    "B_decode_bound": dict(n_prefill=8, n_decode=1, speedup=2.0),
    "C_no_store": dict(n_prefill=8, n_decode=4, speedup=1.5, store_dram_blocks=0, store_ssd_blocks=0),
}
SCENARIO_RUNS = {
    "A_prefill_bound": (POLICIES, REJECTIONS),
    "B_decode_bound": (("mooncake",), REJECTIONS),
    "C_no_store": (("round_robin", "mooncake"), ("none", "predicted")),
}


def run_one(trace, base: SimConfig, **overrides) -> dict:
    cfg = dataclasses.replace(base, **overrides)
    start = time.perf_counter()
    records = simulate(trace, cfg)
    span = max(r.arrival_s for r in records) if records else 0.0
    out = summarize(records, cfg, span)
    out["wall_s"] = round(time.perf_counter() - start, 2)
    return out


def goal_checks(grid_a: dict, grid_b: dict, grid_c: dict) -> dict:
    a = {k: v["good"] for k, v in grid_a.items()}
    c = {k: v["good"] for k, v in grid_c.items()}
    b = grid_b
    mc, rr = "mooncake", "round_robin"
    pred, load, none = b[f"{mc}/predicted"], b[f"{mc}/load"], b[f"{mc}/none"]
    return {
        "A: mooncake/round_robin good, same rejection": {r: round(a[f"{mc}/{r}"] / max(a[f"{rr}/{r}"], 1), 3)
                                                         for r in REJECTIONS},
        "A: mooncake+predicted / round_robin+none good": round(a[f"{mc}/predicted"] / max(a[f"{rr}/none"], 1), 3),
        "C: mooncake/round_robin good, same rejection": {r: round(c[f"{mc}/{r}"] / max(c[f"{rr}/{r}"], 1), 3)
                                                         for r in ("none", "predicted")},
        "B: predicted/load rejections": round(pred["rejected"] / max(load["rejected"], 1), 3),
        "B: predicted - load SLO attainment": round(pred["slo_attainment"] - load["slo_attainment"], 4),
        "B: predicted/none wasted prefill": round(pred["wasted_prefill_tokens"]
                                                  / max(none["wasted_prefill_tokens"], 1), 3),
    }


def sweep_b_goals(sweep_b: dict) -> list[dict]:
    """The B goal checks at every load of the sweep (same cluster, SLOs and trace slice for every mode)."""
    rows = []
    for i, speed in enumerate(sweep_b["speedups"]):
        pred, load, none = (sweep_b[m][i] for m in ("predicted", "load", "none"))
        rows.append({
            "speedup": speed,
            "rejected": {m: sweep_b[m][i]["rejected"] for m in REJECTIONS},
            "slo_attainment": {m: sweep_b[m][i]["slo_attainment"] for m in REJECTIONS},
            "predicted/load rejections": round(pred["rejected"] / max(load["rejected"], 1), 3),
            "predicted - load SLO attainment": round(pred["slo_attainment"] - load["slo_attainment"], 4),
            "predicted/none wasted prefill": round(pred["wasted_prefill_tokens"]
                                                   / max(none["wasted_prefill_tokens"], 1), 3),
        })
    return rows


def print_sweep_b(rows: list[dict]) -> None:
    print("B sweep (mooncake): load | rejected none/load/predicted | attainment none/load/predicted | "
          "pred/load rej | pred-load attain | pred/none wasted")
    for r in rows:
        rej, att = r["rejected"], r["slo_attainment"]
        print(f"  {r['speedup']:.1f}x | {rej['none']:4d} {rej['load']:4d} {rej['predicted']:4d} | "
              f"{att['none']:.3f} {att['load']:.3f} {att['predicted']:.3f} | {r['predicted/load rejections']:.3f} | "
              f"{r['predicted - load SLO attainment']:+.4f} | {r['predicted/none wasted prefill']:.3f}")


def plot(results: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(22, 4.6))
    grid = results["scenarios"]["A_prefill_bound"]["grid"]
    for j, rej in enumerate(REJECTIONS):
        axes[0].bar([i + j * 0.27 for i in range(len(POLICIES))], [grid[f"{p}/{rej}"]["good"] for p in POLICIES],
                    width=0.27, label=f"rejection={rej}")
    axes[0].set_xticks([i + 0.27 for i in range(len(POLICIES))], POLICIES)
    axes[0].set_ylabel("requests within both SLOs")
    axes[0].set_title("A (prefill-bound, 1.5x): goodput by policy")
    axes[0].legend(fontsize=8)
    sweep_a = results["sweep_A"]
    for key, rows in sweep_a.items():
        if key != "speedups":
            axes[1].plot(sweep_a["speedups"], [r["good"] for r in rows], marker="o", label=key)
    axes[1].set_title("A: requests within SLO vs load")
    axes[1].set_xlabel("trace speed-up (x request rate)")
    axes[1].legend(fontsize=8)
    for ax, (key, label) in zip(axes[2:], [("slo_attainment", "SLO attainment"), ("rejected", "rejections")],
                                strict=True):
        sweep = results["sweep_B"]
        for rej in REJECTIONS:
            ax.plot(sweep["speedups"], [row[key] for row in sweep[rej]], marker="o", label=rej)
        ax.set_xlabel("trace speed-up (x request rate)")
        ax.set_title(f"B (decode-bound), mooncake: {label}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def sweeps(trace_path: str, duration_s: float, base: SimConfig) -> dict:
    """Goal checks at more than one load: A with round_robin vs mooncake, B with every rejection mode."""
    speedups = [1.0, 1.5, 2.0, 2.5, 3.0]
    traces = {s: load_trace(trace_path, duration_s=duration_s, speedup=s) for s in speedups}
    cluster_a = {k: v for k, v in SCENARIOS["A_prefill_bound"].items() if k != "speedup"}
    cluster_b = {k: v for k, v in SCENARIOS["B_decode_bound"].items() if k != "speedup"}
    sweep_a: dict = {"speedups": speedups[:4]}
    for policy in ("round_robin", "mooncake"):
        for rej in ("none", "predicted"):
            sweep_a[f"{policy}/{rej}"] = [run_one(traces[s], base, policy=policy, rejection=rej, **cluster_a)
                                          for s in speedups[:4]]
    sweep_b: dict = {"speedups": speedups}
    for rej in REJECTIONS:
        sweep_b[rej] = [run_one(traces[s], base, policy="mooncake", rejection=rej, **cluster_b) for s in speedups]
    return {"sweep_A": sweep_a, "sweep_B": sweep_b}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trace", default=str(DEFAULT_TRACE))
    ap.add_argument("--duration-s", type=float, default=600.0, help="Slice [0, duration) of the trace.")
    ap.add_argument("--quick", action="store_true", help="Skip the load sweep.")
    ap.add_argument("--name", default="serving_sim")
    args = ap.parse_args(argv)
    base = SimConfig()
    results: dict = {"scenarios": {}}
    for name, sc in SCENARIOS.items():
        trace = load_trace(args.trace, duration_s=args.duration_s, speedup=sc["speedup"])
        cluster = {k: v for k, v in sc.items() if k != "speedup"}
        policies, modes = SCENARIO_RUNS[name]
        grid = {f"{p}/{r}": run_one(trace, base, policy=p, rejection=r, **cluster)
                for p in policies for r in modes}
        results["scenarios"][name] = {"cluster": sc, "requests": len(trace),
                                      "ideal_hit_rate": round(ideal_hit_rate(trace), 4), "grid": grid}
        for key, row in grid.items():
            print(f"{name:16s} {key:24s} good={row['good']:5d} rejected={row['rejected']:4d} "
                  f"attain={row['slo_attainment']:.3f} wasted={row['wasted_prefill_tokens'] / 1e6:6.1f}M "
                  f"hit={row['prefix_hit_rate']:.3f} ttft_p90={row['ttft_s']['p90']:.2f} "
                  f"tbt_p90={row['tbt_s']['p90']:.3f} ({row['wall_s']}s)")
    if not args.quick:
        results.update(sweeps(args.trace, args.duration_s, base))
    results["goals"] = goal_checks(*(results["scenarios"][k]["grid"] for k in SCENARIOS))
    if not args.quick:
        results["goals"]["B sweep"] = sweep_b_goals(results["sweep_B"])
        print_sweep_b(results["goals"]["B sweep"])
    for k, v in results["goals"].items():
        if k != "B sweep":
            print(f"goal {k}: {v}")
    config = {"trace": args.trace, "slice_s": [0, args.duration_s], "scenarios": SCENARIOS,
              "sim": dataclasses.asdict(base) | {"policy": "per run", "rejection": "per run"}}
    from bench.results_io import write_result

    figure = plot(results) if not args.quick else None
    print("wrote", write_result(args.name, config, results, figure))


if __name__ == "__main__":
    main()
