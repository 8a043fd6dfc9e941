"""Simulator vs live: replay one trace slice on a real local cluster and in the simulator; compare TTFT and TBT.

    .venv/bin/python -m bench.serving.sim_vs_live \
        --cost-model bench/serving/cost_models/tiny_l4_h256_cpu.json --limit 60 --policies cache_aware,mooncake

Per policy: start a fresh cluster (``--prefill``/``--decode`` CPU workers serving ``--model``, the conductor with
that policy and the cost model), send ``--probes`` isolated requests one at a time, replay the slice through the
OpenAI API, stop the cluster. The probes measure what the engine timings behind the cost model lack: the services'
fixed cost per request (HTTP, tokenizing, Place, the Prefill and Decode RPCs) and per streamed token, and (a burst
of ``--burst`` concurrent probes) the decode side's cost per KV fetch. The simulator then runs the same slice, same
cluster shape, with prefill batched as the engine batches it (``SimConfig.prefill_batch_tokens``): "calibrated" is
the cost model as calibrated; "calibrated+overheads" adds the measured overheads (p0, d0, transfer_latency_s, and
the decode side's KV fetch per request); two more rows take one fix away each (serial prefill; free KV fetch).
``--write-corrected`` saves the model with the overheads of the first pass.

The slice is scaled the same way for both sides: each trace hash_id is ``--block-tokens`` tokens (the trace used
512), prompts keep at most ``--max-blocks`` blocks, outputs at most ``--max-output`` tokens, arrivals / ``--speedup``.
TBT is the FAST'25 one (mean of a request's slowest 10% of token gaps), median over requests on both sides.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

from bench.serving.replay import PromptBuilder, ReplayResult, replay, stream_one, summarize
from bench.serving.sim import SimConfig, simulate
from bench.serving.sim_metrics import summarize as sim_summarize
from bench.serving.trace import DEFAULT_TRACE, TraceRequest, load_trace
from crescent.services.conductor.cost_model import CostModel

REPO = Path(__file__).resolve().parents[2]


def scale_trace(trace: list[TraceRequest], block_tokens: int, max_blocks: int,
                max_output: int) -> list[TraceRequest]:
    """The trace as the live replay sends it: prompt = its first ``max_blocks`` hash_ids, ``block_tokens`` each."""
    out = []
    for r in trace:
        ids = r.hash_ids[:max_blocks]
        out.append(TraceRequest(r.arrival_s, len(ids) * block_tokens, min(r.output_length, max_output), ids))
    return out


def worker_flags(args: argparse.Namespace) -> dict[str, object]:
    # One torch thread per worker: the machine's few cores are shared (the calibration used one thread too).
    return {"torch_threads": 1, "num_kv_blocks": args.num_kv_blocks, "max_num_seqs": 32, "device": "cpu",
            "max_num_batched_tokens": args.prefill_batch_tokens, "heartbeat_interval_s": args.heartbeat_s}


def launch(args: argparse.Namespace, policy: str, log_dir: Path):
    from crescent.services.common.launcher import free_port, plan_local_cluster, start_cluster

    extra = {"prefill": worker_flags(args), "decode": worker_flags(args),
             "conductor": {"policy": policy, "rejection": args.rejection, "cost_model_path": args.cost_model,
                           "ttft_slo_s": args.ttft_slo_s, "tbt_slo_s": args.tbt_slo_s,
                           "heartbeat_interval_s": args.heartbeat_s, "heartbeat_timeout_s": 10 * args.heartbeat_s},
             "kvstore": {"dram_capacity_bytes": args.store_mib << 20, "ssd_capacity_bytes": 0,
                         "data_dir": str(log_dir / "ssd"), "heartbeat_interval_s": args.heartbeat_s},
             "gateway": {"ready_poll_s": 0.2, "request_timeout_s": args.timeout_s}}
    plan = plan_local_cluster(args.model, Path(args.model).name, gateway_port=free_port(), prefill=args.prefill,
                              decode=args.decode, free_ports=True, extra=extra)
    env = {"PYTHONPATH": str(REPO), **{k: "" for k in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")}}
    return plan, start_cluster(plan, log_dir, env, timeout_s=args.startup_timeout_s)


async def probe(base_url: str, model: str, n: int, prompt_tokens: int, max_tokens: int, timeout_s: float,
                concurrent: bool = False) -> list[ReplayResult]:
    """``n`` requests with never-seen prompts (no prefix reuse): one after another (no queueing), or all at once."""
    import openai

    client = openai.AsyncOpenAI(base_url=base_url, api_key="probe", max_retries=0)
    builder = PromptBuilder(prompt_tokens, 49152, seed=12345 + concurrent, unique=True)
    prompts = [builder.prompt(TraceRequest(0.0, prompt_tokens, max_tokens, (0,)), 1) for _ in range(n)]
    if concurrent:
        out = list(await asyncio.gather(*(stream_one(client, model, i, p, max_tokens, timeout_s)
                                          for i, p in enumerate(prompts))))
    else:
        out = [await stream_one(client, model, i, p, max_tokens, timeout_s) for i, p in enumerate(prompts)]
    await client.close()
    return out


def overheads(probes: list[ReplayResult], cost: CostModel, prompt_tokens: int) -> dict[str, float]:
    """Live minus predicted, medians over the probes (the first probe is a warm-up and is dropped)."""
    ok = [r for r in probes[1:] if r.ok and len(r.gaps_s) >= 2]
    if not ok:
        raise RuntimeError("no probe request succeeded; see the cluster logs")
    ttft = statistics.median(r.ttft_s for r in ok)
    first_gap = statistics.median(r.gaps_s[0] for r in ok)
    steady_gap = statistics.median(statistics.mean(r.gaps_s[1:]) for r in ok)
    step = cost.decode_step_time(1, prompt_tokens + 1)
    return {"probe_ttft_s": ttft, "predicted_prefill_s": cost.prefill_time(prompt_tokens),
            "request_overhead_s": max(0.0, ttft - cost.prefill_time(prompt_tokens)),
            "probe_first_gap_s": first_gap, "probe_steady_gap_s": steady_gap, "predicted_step_s": step,
            "token_overhead_s": max(0.0, steady_gap - step)}


def fit_kv_load_latency(burst: list[ReplayResult], cost: CostModel, args: argparse.Namespace,
                        grid_s: tuple[float, ...] = tuple(i / 1000 for i in range(0, 101))) -> float:
    """The decode side's fixed cost per KV fetch (cost.transfer_latency_s) that makes the simulator reproduce the
    burst probe's median TBT: a burst's requests reach decode together, and their fetches queue there.

    Fit on the probe only; the trace slice then tests it."""
    ok = [r for r in burst if r.ok and r.gaps_s]
    if not ok:
        raise RuntimeError("no burst probe request succeeded; see the cluster logs")
    live = statistics.median(r.tbt_s for r in ok)
    trace = [TraceRequest(0.0, args.probe_tokens, args.max_output, (-1 - i,)) for i in range(len(burst))]

    def sim_tbt(latency: float) -> float:
        trial = dataclasses.replace(cost, transfer_latency_s=latency)
        records = simulate(trace, sim_config(args, trial, "cache_aware", decode_loads_kv=True))
        return statistics.median(r.tbt_s for r in records if r.finished)

    return min(grid_s, key=lambda lat: abs(sim_tbt(lat) - live))


def corrected(cost: CostModel, over: dict[str, float]) -> CostModel:
    p0, p1, p2 = cost.prefill_s
    d0, d1, d2 = cost.decode_step_s
    latency = over.get("kv_load_latency_s", cost.transfer_latency_s)
    return dataclasses.replace(
        cost, prefill_s=(p0 + over["request_overhead_s"], p1, p2), transfer_latency_s=latency,
        decode_step_s=(d0 + over["token_overhead_s"], d1, d2),
        source=cost.source + f"; + service overheads measured live by sim_vs_live: "
                             f"{over['request_overhead_s'] * 1e3:.1f} ms/request on p0, "
                             f"{over['token_overhead_s'] * 1e3:.1f} ms/token on d0, "
                             f"{latency * 1e3:.1f} ms per KV fetch (transfer_latency_s)")


CALIBRATION_PREFILL = ((16, 0), (64, 0), (128, 0), (256, 0), (128, 128), (32, 224))
CALIBRATION_DECODE = ((1, 64), (4, 64), (8, 256), (16, 64), (16, 192), (4, 256))


def calibrate_now(args: argparse.Namespace, base: CostModel) -> tuple[CostModel, dict]:
    """Re-time the engine just before a live pass: on a shared machine its speed drifts by 2x within minutes
    (other jobs come and go), so a model timed earlier says little about the pass. Medians, as the pass sees them.
    """
    import torch

    from crescent.engine.llm_engine import LLMEngine
    from crescent.engine.settings import EngineSettings
    from crescent.services.conductor.calibrate import calibrate_with_samples
    from crescent.services.worker.calibrate import EngineProfile

    torch.set_num_threads(1)  # as the workers run
    settings = EngineSettings(model=args.model, device="cpu", torch_threads=1, num_kv_blocks=args.num_kv_blocks)
    model, samples = calibrate_with_samples(
        lambda: EngineProfile(LLMEngine.from_settings(settings), decode_steps=8), CALIBRATION_PREFILL,
        CALIBRATION_DECODE, repeats=3, source=f"calibrated in-run by sim_vs_live (median of 3): {args.model}")
    return dataclasses.replace(model, bandwidth_bps=dict(base.bandwidth_bps),
                               transfer_latency_s=base.transfer_latency_s), samples


def sim_config(args: argparse.Namespace, cost: CostModel, policy: str, batch_prefill: bool = True,
               decode_loads_kv: bool = False) -> SimConfig:
    block_bytes = cost.kv_bytes_per_token * args.block_tokens
    return SimConfig(n_prefill=args.prefill, n_decode=args.decode, block_tokens=args.block_tokens,
                     prefill_cache_blocks=args.num_kv_blocks, store_dram_blocks=(args.store_mib << 20) // block_bytes,
                     store_ssd_blocks=0, decode_kv_tokens=args.num_kv_blocks * args.block_tokens,
                     ttft_slo_s=args.ttft_slo_s, tbt_slo_s=args.tbt_slo_s, max_queue_per_instance=64,
                     prefill_batch_tokens=args.prefill_batch_tokens if batch_prefill else 0,
                     decode_loads_kv=decode_loads_kv,
                     max_tokens=args.max_output, heartbeat_interval_s=args.heartbeat_s, policy=policy,
                     rejection=args.rejection, cost=cost)


def run_sim(trace: list[TraceRequest], args: argparse.Namespace, cost: CostModel, policy: str,
            batch_prefill: bool = True, decode_loads_kv: bool = True) -> dict:
    cfg = sim_config(args, cost, policy, batch_prefill, decode_loads_kv)
    records = simulate(trace, cfg)
    return sim_summarize(records, cfg, max((r.arrival_s for r in records), default=0.0))


def ratio(sim: dict, live: dict, key: str) -> float | None:
    a, b = sim[key].get("p50"), live[key].get("p50")
    return round(a / b, 3) if a and b else None


def run_policy(args: argparse.Namespace, policy: str, trace: list[TraceRequest], cost: CostModel) -> dict:
    log_dir = Path(tempfile.mkdtemp(prefix=f"crescent-simlive-{policy}-"))
    samples = None
    if args.calibrate:
        cost, samples = calibrate_now(args, cost)
        print(f"[{policy}] calibrated in-run: prefill {cost.prefill_s}, decode {cost.decode_step_s}", flush=True)
    started = time.perf_counter()
    plan, group = launch(args, policy, log_dir)
    print(f"[{policy}] cluster up in {time.perf_counter() - started:.1f}s; logs in {log_dir}", flush=True)
    base_url, name = plan.gateway_url + "/v1", Path(args.model).name
    try:
        probes = asyncio.run(probe(base_url, name, args.probes, args.probe_tokens, args.max_output, args.timeout_s))
        over = overheads(probes, cost, args.probe_tokens)
        burst = asyncio.run(probe(base_url, name, args.burst, args.probe_tokens, args.max_output, args.timeout_s,
                                  concurrent=True))
        over["burst_tbt_p50_s"] = statistics.median(r.tbt_s for r in burst if r.ok) if any(r.ok for r in burst) else 0
        over["kv_load_latency_s"] = fit_kv_load_latency(burst, corrected(cost, over), args)
        print(f"[{policy}] overheads {({k: round(v, 4) for k, v in over.items()})}", flush=True)
        builder = PromptBuilder(args.block_tokens, 49152, seed=args.seed)
        results = asyncio.run(replay(trace, base_url, name, builder, args.max_blocks, args.max_output,
                                     args.max_duration_s, args.timeout_s))
    finally:
        group.stop()
    live = summarize(results, args.ttft_slo_s, args.tbt_slo_s)
    fixed = corrected(cost, over)
    # Every row batches prefill as the engine does unless it says serial_prefill; "+overheads" rows also pay the
    # decode service's KV fetch per request unless they say free_kv_load.
    sims = {"calibrated": run_sim(trace, args, cost, policy, decode_loads_kv=False),
            "calibrated+overheads": run_sim(trace, args, fixed, policy),
            "calibrated+overheads,serial_prefill": run_sim(trace, args, fixed, policy, batch_prefill=False),
            "calibrated+overheads,free_kv_load": run_sim(trace, args, fixed, policy, decode_loads_kv=False)}
    compare = {k: {"ttft_p50_sim_over_live": ratio(s, live, "ttft_s"), "tbt_p50_sim_over_live": ratio(s, live, "tbt_s")}
               for k, s in sims.items()}
    print(f"[{policy}] live {live}\n[{policy}] sim/live {compare}", flush=True)
    return {"live": live, "sim": sims, "sim_over_live": compare, "overheads": over, "corrected_cost": fixed,
            "cost": dataclasses.asdict(cost), "calibration_samples": samples,
            "live_requests": [dataclasses.asdict(r) | {"gaps_s": [round(g, 5) for g in r.gaps_s]} for r in results],
            "log_dir": str(log_dir)}


def spread(per_policy: dict) -> dict:
    """Live vs live and sim vs live, over every pass: how far apart repeated live passes are is the yardstick the
    simulator's error is read against (the placement is the same for every policy when there is one instance each)."""
    out: dict = {}
    for metric in ("ttft", "tbt"):
        live = [r["live"][f"{metric}_s"].get("p50", 0) for r in per_policy.values()]
        row: dict = {"live_p50_max_over_min": round(max(live) / max(min(live), 1e-9), 3)}
        for variant in next(iter(per_policy.values()))["sim_over_live"]:
            ratios = [r["sim_over_live"][variant][f"{metric}_p50_sim_over_live"] for r in per_policy.values()]
            row[variant] = {"sim_over_live_p50": ratios,
                            "passes_within_25pct": sum(x is not None and 0.75 <= x <= 1.25 for x in ratios)}
        out[metric] = row
    return out


def plot(per_policy: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    passes = list(per_policy)
    rows = ["live", *next(iter(per_policy.values()))["sim"]]
    width = 0.8 / len(rows)
    for ax, (metric, title) in zip(axes, (("ttft_s", "median TTFT (s)"), ("tbt_s", "median TBT (s, FAST'25)")),
                                   strict=True):
        for j, row in enumerate(rows):
            values = [(per_policy[p]["live"] if row == "live" else per_policy[p]["sim"][row])[metric].get("p50", 0)
                      for p in passes]
            ax.bar([i + j * width for i in range(len(passes))], values, width=width,
                   label=row if row == "live" else f"sim: {row}")
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(passes))], passes)
        ax.set_xlabel("live pass (policy; #n = a repeat)")
        ax.set_title(title)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(Path.home() / ".cache/crescent/models/crescent-tiny-l4-h256"),
                    help="Model folder the workers serve (the one the cost model was calibrated on).")
    ap.add_argument("--cost-model", required=True, help="Calibrated cost model JSON (conductor and simulator).")
    ap.add_argument("--calibrate", action="store_true",
                    help="Re-time the engine before each live pass and use that model for the pass (recommended "
                         "on a shared machine; --cost-model then only supplies the transfer fields).")
    ap.add_argument("--write-corrected", default="", help="Also save the cost model + measured overheads here.")
    ap.add_argument("--policies", default="cache_aware,mooncake")
    ap.add_argument("--rejection", default="none", choices=("none", "load", "predicted"))
    ap.add_argument("--prefill", type=int, default=1)
    ap.add_argument("--decode", type=int, default=1)
    ap.add_argument("--trace", default=str(DEFAULT_TRACE))
    ap.add_argument("--start-s", type=float, default=0.0, help="Slice start in trace time.")
    ap.add_argument("--limit", type=int, default=60, help="Requests in the slice.")
    ap.add_argument("--speedup", type=float, default=1.0)
    ap.add_argument("--block-tokens", type=int, default=16, help="Tokens per trace hash_id (= the KV block size).")
    ap.add_argument("--max-blocks", type=int, default=16)
    ap.add_argument("--max-output", type=int, default=16)
    ap.add_argument("--probes", type=int, default=8, help="Isolated requests that measure service overheads.")
    ap.add_argument("--probe-tokens", type=int, default=128)
    ap.add_argument("--burst", type=int, default=8, help="Requests of the concurrent probe (fits the KV fetch cost).")
    ap.add_argument("--num-kv-blocks", type=int, default=512, help="Paged KV blocks per worker.")
    ap.add_argument("--prefill-batch-tokens", type=int, default=2048,
                    help="Engine token budget per forward pass (workers' max_num_batched_tokens; the simulator's "
                         "prefill batch).")
    ap.add_argument("--store-mib", type=int, default=64, help="kvstore DRAM tier.")
    ap.add_argument("--heartbeat-s", type=float, default=0.5)
    ap.add_argument("--ttft-slo-s", type=float, default=2.0)
    ap.add_argument("--tbt-slo-s", type=float, default=0.2)
    ap.add_argument("--timeout-s", type=float, default=120.0, help="Per request.")
    ap.add_argument("--max-duration-s", type=float, default=120.0, help="Send nothing later than this.")
    ap.add_argument("--startup-timeout-s", type=float, default=300.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default="serving_sim_vs_live")
    ap.add_argument("--replot", default="", help="Only redraw the PNG beside this result JSON.")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.replot:  # redraw the PNG from a result's JSON (the JSON is left as it is)
        import json

        path = Path(args.replot)
        plot(json.loads(path.read_text())["results"]["policies"]).savefig(path.with_suffix(".png"), dpi=110,
                                                                          bbox_inches="tight")
        return
    cost = CostModel.load(args.cost_model)
    trace = scale_trace(load_trace(args.trace, start_s=args.start_s, speedup=args.speedup, limit=args.limit),
                        args.block_tokens, args.max_blocks, args.max_output)
    per_policy: dict[str, dict] = {}
    for i, policy in enumerate(args.policies.split(",")):  # a policy named twice is a repeat: "mooncake#2"
        key = policy if policy not in per_policy else f"{policy}#{i}"
        per_policy[key] = run_policy(args, policy, trace, cost)
    if args.write_corrected:
        fixed = per_policy[next(iter(per_policy))]["corrected_cost"]
        fixed.save(args.write_corrected)
        print("wrote", args.write_corrected)
    for res in per_policy.values():
        res["corrected_cost"] = dataclasses.asdict(res["corrected_cost"])
    results = {"policies": per_policy, "spread": spread(per_policy)}
    print("spread", results["spread"])
    config = vars(args) | {"requests": len(trace), "trace_span_s": round(trace[-1].arrival_s, 2) if trace else 0,
                           "cost_model": dataclasses.asdict(cost)}
    from bench.results_io import write_result

    print("wrote", write_result(args.name, config, results, plot(per_policy)))


if __name__ == "__main__":
    main()
