"""The trace suite: every placement policy x rejection mode on every trace and load point, on measured hardware.

    .venv/bin/python -m bench.serving.trace_suite [--quick] [--name serving_trace_suite]

Traces: the FAST'25 conversation trace (a slice) and the generators of trace_gen.py (long-context documents,
agent sessions, bursty chat, oscillating decode), shrunk to the sizes the calibrated CPU machine serves (a 512-token
block becomes 16 tokens, outputs / 32). The conductor plans with the calibrated fit
(bench/serving/cost_models/tiny_l4_h256_cpu.json); the simulated machines run at a bootstrapped refit of that
calibration's recorded samples with per-operation noise drawn from their measured/fitted spread
(sim_hardware.py), so a prediction is never checked against itself. Writes bench/results/<name>.json + .png
(appending a run) with the goal checks of issue #20, every miss included.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from pathlib import Path

from bench.serving import trace_gen
from bench.serving.sim import SimConfig
from bench.serving.sim_hardware import MeasuredHardware, Samples
from bench.serving.sim_metrics import ideal_hit_rate
from bench.serving.sim_run import POLICIES, REJECTIONS, run_one
from bench.serving.trace import DEFAULT_TRACE, TraceRequest, load_trace
from bench.serving.trace_suite_goals import goal_checks
from crescent.services.conductor.cost_model import CostModel

COST_MODELS = Path(__file__).resolve().parent / "cost_models"
PLANNER = COST_MODELS / "tiny_l4_h256_cpu.json"
SAMPLES = COST_MODELS / "tiny_l4_h256_cpu.samples.json"
INPUT_DIVISOR, OUTPUT_DIVISOR = 32, 32  # 512-token trace blocks -> 16-token blocks; outputs / 32 too
LOADS = (0.75, 1.0, 1.5, 2.0)  # x each trace's nominal rate (about what the cluster serves within SLO)


@dataclasses.dataclass(frozen=True)
class TraceSpec:
    """One trace of the suite: a generator and its arguments at the nominal rate, and whether it is long-context.

    Kept as data (not a closure) so that every result's config records exactly what ran.
    """

    make: Callable[..., list[TraceRequest]]  # (n, **kwargs) -> trace in 512-token blocks
    kwargs: dict = dataclasses.field(default_factory=dict)
    long_context: bool = False

    def build(self, n: int) -> list[TraceRequest]:
        return self.make(n, **self.kwargs)

    @property
    def text(self) -> str:
        return f"{self.make.__name__}(n, {', '.join(f'{k}={v!r}' for k, v in self.kwargs.items())})"


def conversation(n: int, speedup: float = 4.0) -> list[TraceRequest]:
    """The FAST'25 conversation trace's first ``n`` requests; its own rate (about 3 requests/s) x 4 is about
    what 4 CPU prefill instances serve."""
    return trace_gen.speed_up(load_trace(DEFAULT_TRACE, limit=n), speedup)


# Periods are short enough that a --quick trace (400 requests, ~10 s) spans several bursts and swings.
SUITE: dict[str, TraceSpec] = {
    "conversation": TraceSpec(conversation, {"speedup": 4.0}),
    "long_documents": TraceSpec(trace_gen.long_context_documents, {"rate_per_s": 16.0, "seed": 1},
                                long_context=True),
    "agent_sessions": TraceSpec(trace_gen.agent_sessions, {"rate_per_s": 400.0, "seed": 2}),
    "bursty_chat": TraceSpec(trace_gen.bursty_chat, {"rate_per_s": 90.0, "seed": 3, "period_s": 3.0}),
    "oscillating_decode": TraceSpec(trace_gen.oscillating_decode, {"rate_per_s": 40.0, "seed": 4, "period_s": 6.0}),
}


def base_config(hardware: MeasuredHardware, planner: CostModel) -> SimConfig:
    """The cluster every trace runs on: 4 prefill + 3 decode CPU instances and a store, SLOs for CPU sizes."""
    return SimConfig(n_prefill=4, n_decode=3, block_tokens=512 // INPUT_DIVISOR, prefill_cache_blocks=600,
                     store_dram_blocks=4000, store_ssd_blocks=40_000, decode_kv_tokens=32_768, ttft_slo_s=2.0,
                     tbt_slo_s=0.25, max_queue_per_instance=32, max_tokens=256, heartbeat_interval_s=0.5,
                     cost=planner, true_cost=hardware)  # type: ignore[arg-type]  (duck-typed CostModel)


def run_suite(requests: int, loads: tuple[float, ...], seed: int = 0, traces: tuple[str, ...] = tuple(SUITE),
              ) -> dict:
    planner = CostModel.load(PLANNER)
    samples = Samples.load(SAMPLES)
    out: dict = {"traces": {}}
    for name in traces:
        spec = SUITE[name]
        nominal = trace_gen.scale_tokens(spec.build(requests), INPUT_DIVISOR, OUTPUT_DIVISOR)
        entry: dict = {"long_context": spec.long_context, "requests": len(nominal),
                       "ideal_hit_rate": round(ideal_hit_rate(nominal, 512 // INPUT_DIVISOR), 4),
                       "nominal_rate_per_s": round(len(nominal) / max(nominal[-1].arrival_s, 1e-9), 3),
                       "loads": {}}
        for load in loads:
            trace = trace_gen.speed_up(nominal, load)
            grid = {}
            for policy in POLICIES:
                for rejection in REJECTIONS:
                    # Fresh machines per run, same seed: every policy meets the same hardware.
                    hardware = MeasuredHardware.from_samples(planner, samples, seed=seed)
                    row = run_one(trace, base_config(hardware, planner), policy=policy, rejection=rejection)
                    grid[f"{policy}/{rejection}"] = row
                    print(f"{name:18s} x{load:<4} {policy:12s} {rejection:9s} good={row['good']:4d} "
                          f"rej={row['rejected']:4d} attain={row['slo_attainment']:.3f} "
                          f"hit={row['prefix_hit_rate']:.3f} ttft_p90={row['ttft_s']['p90']:.2f} "
                          f"tbt_p90={row['tbt_s']['p90']:.3f} ({row['wall_s']}s)", flush=True)
            entry["loads"][str(load)] = grid
        out["traces"][name] = entry
    out["goals"] = goal_checks(out["traces"])
    return out


def plot(results: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    traces = results["traces"]
    fig, axes = plt.subplots(2, len(traces), figsize=(4.2 * len(traces), 8), squeeze=False)
    for j, (name, entry) in enumerate(traces.items()):
        loads = [float(x) for x in entry["loads"]]
        for policy in POLICIES:
            axes[0][j].plot(loads, [g[f"{policy}/load"]["good"] for g in entry["loads"].values()], marker="o",
                            label=policy)
        axes[0][j].set_title(f"{name}: good (rejection=load)", fontsize=9)
        for rejection in REJECTIONS:
            axes[1][j].plot(loads, [g[f"mooncake/{rejection}"]["rejected"] for g in entry["loads"].values()],
                            marker="o", label=rejection)
        axes[1][j].set_title(f"{name}: mooncake rejections", fontsize=9)
        axes[1][j].set_xlabel("load (x nominal rate)")
        axes[0][j].legend(fontsize=7)
        axes[1][j].legend(fontsize=7)
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=1200, help="Requests per trace.")
    ap.add_argument("--quick", action="store_true", help="400 requests per trace.")
    ap.add_argument("--seed", type=int, default=0, help="Seed of the hardware's bootstrap and noise.")
    ap.add_argument("--traces", default=",".join(SUITE), help="Comma-separated subset of " + ",".join(SUITE))
    ap.add_argument("--name", default="serving_trace_suite")
    args = ap.parse_args(argv)
    requests = 400 if args.quick else args.requests
    traces = tuple(t for t in args.traces.split(",") if t)
    unknown = set(traces) - set(SUITE)
    if unknown:
        ap.error(f"unknown traces {sorted(unknown)}; choose from {list(SUITE)}")
    results = run_suite(requests, LOADS, seed=args.seed, traces=traces)
    for key, value in results["goals"]["summary"].items():
        print(f"goal {key}: {value}")
    hardware = MeasuredHardware.from_samples(CostModel.load(PLANNER), Samples.load(SAMPLES), seed=args.seed)
    sim = base_config(hardware, CostModel())
    config = {"requests_per_trace": requests, "loads": list(LOADS), "traces": {t: SUITE[t].text for t in traces},
              "input_divisor": INPUT_DIVISOR, "output_divisor": OUTPUT_DIVISOR,
              "planner_cost_model": str(PLANNER.relative_to(COST_MODELS.parents[2])),
              "hardware": "bootstrapped refit of the planner's calibration samples + per-op measured spread; "
                          "transfers at the planner's rates",
              "hardware_detail": hardware.describe(),
              "sim": {f.name: getattr(sim, f.name) for f in dataclasses.fields(sim)
                      if f.name not in ("cost", "true_cost")}}
    from bench.results_io import write_result

    print("wrote", write_result(args.name, config, results, plot(results)))


if __name__ == "__main__":
    main()
