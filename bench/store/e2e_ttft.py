"""End-to-end TTFT through the cluster: a 2K-token prompt whose first 90% is in the kvstore, against the same-size
prompt cold (no prefix anywhere).

    .venv/bin/python -m bench.store.e2e_ttft --trials 5

Cluster (separate processes, free ports, 127.0.0.1): conductor with the ``round_robin`` policy, kvstore (tcp),
two prefill workers, one decode worker, gateway; SmolLM2-135M-Instruct on CPU. Requests go through the official
openai client (``/v1/completions`` with token-id prompts, streaming, max_tokens=1, temperature 0): TTFT is the
time from sending the request to its first token chunk.

One trial: a *seed* request (prefix P of 90% + suffix S1) makes one prefill worker compute P and put its blocks in
the store; the *warm* request (P + S2) follows it at once, so round robin places it on the OTHER prefill worker,
whose own cache has never seen P: P's KV can only come from the store. The *cold* request is a fresh random
prompt of the same length. Trials alternate the order (seed, warm, cold) / (cold, seed, warm), so warm and cold
interleave. Every request is checked against the prefill workers' /metrics deltas (which worker served it, prompt
tokens loaded from the kvstore, tokens found in its own cache, tokens computed); a warm request that did not load
its prefix from the store, or a cold one that reused anything, is reported and left out of the medians.
Writes bench/results/store_e2e_ttft.{json,png}.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import openai

from bench.results_io import write_result

REPO = Path(__file__).resolve().parents[2]
COUNTERS = {"served": ("crescent_worker_requests_total", {"role": "prefill", "outcome": "ok"}),
            "store_hit_tokens": ("crescent_worker_kvstore_hit_tokens_total", {"role": "prefill"}),
            "prefix_hit_tokens": ("crescent_worker_prefix_cache_hits_total", {"role": "prefill"}),
            "computed_tokens": ("crescent_worker_prompt_tokens_total", {"role": "prefill"})}


def scrape_counters(url: str) -> dict[str, float]:
    from tests.integration.real_cluster import scrape

    return {key: scrape([url], name, labels) for key, (name, labels) in COUNTERS.items()}


def start(args: argparse.Namespace, logs: Path):
    from crescent.models.prepare import prepare_model
    from crescent.services.common.launcher import free_port, plan_local_cluster, start_cluster

    model = prepare_model(args.model)
    worker = {"torch_threads": args.torch_threads, "device": "cpu", "num_kv_blocks": 512,
              "heartbeat_interval_s": 0.5, "kvstore_timeout_s": 120}
    extra = {"prefill": worker, "decode": {**worker, "num_kv_blocks": 256},
             "conductor": {"policy": "round_robin", "rejection": "none", "heartbeat_interval_s": 0.5},
             "kvstore": {"dram_capacity_bytes": 1 << 30, "ssd_capacity_bytes": 0, "dram_prefault": False,
                         "data_dir": str(logs / "ssd")}}
    plan = plan_local_cluster(str(model), model.name, gateway_port=free_port(), prefill=2, free_ports=True,
                              extra=extra)
    env = {"PYTHONPATH": str(REPO), **{k: "" for k in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")}}
    return plan, model.name, start_cluster(plan, logs, env, timeout_s=600)


class Driver:
    def __init__(self, base_url: str, model: str, prefill_urls: list[str], timeout_s: float):
        self.http = httpx.AsyncClient(trust_env=False, timeout=timeout_s)  # loopback only: never a proxy
        self.client = openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="none", max_retries=0,
                                         timeout=timeout_s, http_client=self.http)
        self.model = model
        self.prefill_urls = prefill_urls

    async def ttft(self, prompt: list[int]) -> tuple[float, int]:
        """(seconds to the first token chunk, cached tokens the gateway reported)."""
        t0 = time.perf_counter()
        stream = await self.client.completions.create(model=self.model, prompt=prompt, max_tokens=1,
                                                      temperature=0, stream=True,
                                                      stream_options={"include_usage": True})
        first, cached = None, 0
        async for chunk in stream:
            if first is None and chunk.choices:
                first = time.perf_counter() - t0
            if chunk.usage is not None and chunk.usage.prompt_tokens_details is not None:
                cached = chunk.usage.prompt_tokens_details.cached_tokens or 0
        if first is None:
            raise RuntimeError("the stream ended without a token")
        return first, cached

    async def measured(self, kind: str, prompt: list[int], settle_s: float) -> dict:
        """One request with the prefill workers' counter deltas (settle: the hit counter moves on heartbeats)."""
        before = [await asyncio.to_thread(scrape_counters, u) for u in self.prefill_urls]
        ttft, cached = await self.ttft(prompt)
        await asyncio.sleep(settle_s)
        after = [await asyncio.to_thread(scrape_counters, u) for u in self.prefill_urls]
        deltas = [{k: a[k] - b[k] for k in a} for a, b in zip(after, before, strict=True)]
        served = [i for i, d in enumerate(deltas) if d["served"] >= 1]
        d = deltas[served[0]] if len(served) == 1 else {k: float("nan") for k in COUNTERS}
        return {"kind": kind, "ttft_s": ttft, "gateway_cached_tokens": cached,
                "prefill_instance": served[0] if len(served) == 1 else -1,
                "store_hit_tokens": d["store_hit_tokens"], "computed_tokens": d["computed_tokens"],
                "own_cache_tokens": d["prefix_hit_tokens"] - d["store_hit_tokens"]}


def random_tokens(rng: random.Random, n: int) -> list[int]:
    # Ordinary BPE ids (SmolLM2's special tokens are below 20); random, so no prompt shares a block with another.
    return [rng.randrange(1000, 48000) for _ in range(n)]


def check(rec: dict, seed_instance: int, prefix_tokens: int, block: int) -> str:
    """Empty when the request reused exactly what it should; else why it does not count."""
    if rec["prefill_instance"] < 0:
        return "could not tell which prefill worker served it"
    if rec["kind"] == "warm":
        if rec["prefill_instance"] == seed_instance:
            return "placed on the seed's own prefill worker"
        if rec["store_hit_tokens"] < prefix_tokens - block or rec["own_cache_tokens"] > block:
            return f"loaded {rec['store_hit_tokens']:.0f} tokens from the store, {rec['own_cache_tokens']:.0f} own"
    if rec["kind"] == "cold" and (rec["store_hit_tokens"] > 0 or rec["own_cache_tokens"] > 0):
        return "a cold request reused KV"
    return ""


async def run_trials(drv: Driver, args: argparse.Namespace) -> list[dict]:
    rng = random.Random(args.seed)
    prefix_len = int(args.prompt_tokens * args.prefix_fraction)
    for _ in range(2):  # one warm-up per prefill worker (round robin): first-call costs stay out of the numbers
        await drv.ttft(random_tokens(rng, args.prompt_tokens))
    records = []
    for trial in range(args.trials):
        prefix = random_tokens(rng, prefix_len)
        seed = prefix + random_tokens(rng, args.prompt_tokens - prefix_len)
        warm = prefix + random_tokens(rng, args.prompt_tokens - prefix_len)
        cold = random_tokens(rng, args.prompt_tokens)
        order = [("seed", seed), ("warm", warm), ("cold", cold)]
        if trial % 2:
            order = order[2:] + order[:2]
        seed_instance = -1
        for kind, prompt in order:
            rec = {"trial": trial, **await drv.measured(kind, prompt, args.settle_s)}
            seed_instance = rec["prefill_instance"] if kind == "seed" else seed_instance
            rec["excluded"] = check(rec, seed_instance, prefix_len, 16)
            records.append(rec)
            print(f"trial {trial} {kind:4s} ttft {rec['ttft_s']:.3f}s prefill-{rec['prefill_instance']} "
                  f"store {rec['store_hit_tokens']:.0f} own {rec['own_cache_tokens']:.0f} "
                  f"computed {rec['computed_tokens']:.0f} {rec['excluded']}", flush=True)
    await drv.client.close()
    return records


def summarize(records: list[dict]) -> dict:
    out: dict = {}
    for kind in ("warm", "cold", "seed"):
        valid = [r["ttft_s"] for r in records if r["kind"] == kind and not r["excluded"]]
        out[kind] = {"n": len(valid), "excluded": sum(1 for r in records if r["kind"] == kind and r["excluded"]),
                     "median_ttft_s": statistics.median(valid) if valid else None, "ttfts_s": valid}
    warm, cold = out["warm"]["median_ttft_s"], out["cold"]["median_ttft_s"]
    out["warm_over_cold"] = warm / cold if warm and cold else None
    return out


def plot(records: list[dict], summary: dict, goal: float):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for kind, color in (("cold", "tab:red"), ("warm", "tab:green"), ("seed", "tab:grey")):
        rs = [r for r in records if r["kind"] == kind and not r["excluded"]]
        left.plot([r["trial"] for r in rs], [r["ttft_s"] for r in rs], "o-", color=color, label=kind)
    left.xaxis.get_major_locator().set_params(integer=True)
    left.set_xlabel("trial")
    left.set_ylabel("TTFT (s)")
    left.set_title("TTFT per request (interleaved)")
    left.legend()
    cold = summary["cold"]["median_ttft_s"] or 0.0
    right.bar(["cold", "warm (90% from kvstore)"], [cold, summary["warm"]["median_ttft_s"] or 0.0],
              color=["tab:red", "tab:green"])
    right.axhline(goal * cold, color="black", linestyle="--", label=f"goal: {goal:.0%} of cold")
    ratio = summary["warm_over_cold"]
    right.set_title(f"median TTFT, warm/cold = {ratio:.2f}" if ratio else "median TTFT")
    right.set_ylabel("seconds")
    right.legend()
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="default")
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--prompt-tokens", type=int, default=2048)
    p.add_argument("--prefix-fraction", type=float, default=0.9)
    p.add_argument("--torch-threads", type=int, default=2, help="per worker (only one prefill runs at a time)")
    p.add_argument("--settle-s", type=float, default=1.2, help="wait for the heartbeat-driven hit counter")
    p.add_argument("--timeout-s", type=float, default=300.0, help="per request")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--goal", type=float, default=0.35, help="target warm/cold ratio drawn on the plot")
    args = p.parse_args(argv)
    logs = Path(tempfile.mkdtemp(prefix="bench-e2e-ttft-"))
    load_before = os.getloadavg()
    plan, name, group = start(args, logs)
    try:
        drv = Driver(plan.gateway_url, name, plan.metrics_urls("prefill"), args.timeout_s)
        records = asyncio.run(run_trials(drv, args))
    finally:
        group.stop()
    summary = summarize(records)
    config = {k: v for k, v in vars(args).items()} | {"policy": "round_robin", "prefill_workers": 2,
                                                        "decode_workers": 1, "transport": "tcp", "device": "cpu",
                                                        "model_name": name}
    results = {**summary, "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "requests": records}
    path = write_result("store_e2e_ttft", config, results, plot(records, summary, args.goal))
    print(f"warm median {summary['warm']['median_ttft_s']}, cold median {summary['cold']['median_ttft_s']}, "
          f"ratio {summary['warm_over_cold']}; wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
