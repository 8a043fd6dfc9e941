"""TPOT through `crescent up` (disagg and agg) against the engine's own decode step time, one request at a time.

    .venv/bin/python -m bench.serving.tpot --tiny
    .venv/bin/python -m bench.serving.tpot --model default --max-tokens 64

Engine: the model in this process (LLMEngine, same torch threads as each worker); its own step time is the mean
duration of its decode steps (``step_observer``), batch 1. Cluster: each mode's processes on free ports, driven by
the official openai client, streaming, one request at a time (greedy, ignore_eos, so every run generates
``--max-tokens`` tokens); TPOT = (last token's arrival - first's) / (tokens - 1), as vLLM's benchmark defines it,
pooled over the measured requests.
Each pass also reads the serving worker's own decode step time over the measured requests from its /metrics
(``crescent_worker_step_seconds{kind="decode"}``, the same observer): the fairest baseline, since it ran on the
same machine at the same moment (this machine is shared, so the separate in-process engine pass is noisier).
The goal (issue #13) is TPOT within 10% of the step time. ``--repo`` runs the cluster's processes from another
checkout (e.g. the code before a change) with the same driver. Bounded: ``--timeout-s`` per request.
Appends to bench/results/serving_tpot.json (+ .png).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import tempfile
import time
from pathlib import Path

from bench.results_io import write_result

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def engine_step_time(model_dir: Path, threads: int, max_tokens: int, runs: int) -> dict:
    from crescent.engine.llm_engine import LLMEngine
    from crescent.engine.sampling_params import SamplingParams
    from crescent.engine.settings import EngineSettings
    from crescent.models.tokenizer import Tokenizer

    engine = LLMEngine.from_settings(EngineSettings(model=str(model_dir), device="cpu", torch_threads=threads,
                                                    num_kv_blocks=512, enable_prefix_caching=False))
    tok = Tokenizer.from_dir(model_dir)
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": PROMPT}]))
    steps: list[float] = []
    engine.step_observer = lambda kind, s, prompt, sampled: steps.append(s) if kind == "decode" else None
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    engine.generate([ids], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))  # warm-up
    per_run = []
    for _ in range(runs):
        steps.clear()
        engine.generate([ids], params)
        per_run.append(statistics.fmean(steps))
    return {"step_s": statistics.median(per_run), "step_s_runs": per_run, "prompt_tokens": len(ids)}


def worker_decode_steps(urls: list[str]) -> tuple[float, float]:
    """(seconds, count) of the decode steps the workers behind ``urls`` have observed so far."""
    import httpx

    total = {"sum": 0.0, "count": 0.0}
    for url in urls:
        for line in httpx.get(url, timeout=10, trust_env=False).text.splitlines():
            m = re.match(r'^crescent_worker_step_seconds_(sum|count)\{([^}]*)\} ([0-9.e+-]+)$', line)
            if m and 'kind="decode"' in m.group(2):
                total[m.group(1)] += float(m.group(3))
    return total["sum"], total["count"]


def cluster_tpot(model_dir: Path, mode: str, threads: int, max_tokens: int, runs: int, timeout_s: float,
                 repo: Path) -> dict:
    import openai

    from crescent.services.common.launcher import free_port, plan_local_cluster, start_cluster

    worker = {"torch_threads": threads, "num_kv_blocks": 512, "device": "cpu"}
    extra = {"prefill": worker, "decode": worker, "worker": worker, "conductor": {"rejection": "none"},
             "kvstore": {"ssd_capacity_bytes": 0, "dram_capacity_bytes": 256 << 20}}
    plan = plan_local_cluster(str(model_dir), model_dir.name, gateway_port=free_port(), free_ports=True, extra=extra,
                              mode=mode)
    logs = Path(tempfile.mkdtemp(prefix=f"bench-tpot-{mode}-"))
    here = os.getcwd()
    os.chdir(repo)  # `python -m` puts the working directory first on sys.path: the children import repo's code
    try:
        group = start_cluster(plan, logs, {"PYTHONPATH": str(repo)}, timeout_s=600)
    finally:
        os.chdir(here)
    client = openai.OpenAI(base_url=plan.gateway_url + "/v1", api_key="none", max_retries=0, timeout=timeout_s)
    try:
        tpots, ttfts, chunks, spans, gaps = [], [], [], 0.0, 0
        step_urls = plan.metrics_urls("decode") + plan.metrics_urls("worker")
        for i in range(runs + 1):  # the first is a warm-up
            if i == 1:
                steps0 = worker_decode_steps(step_urls)
            t0 = time.perf_counter()
            stream = client.chat.completions.create(
                model=model_dir.name, messages=[{"role": "user", "content": PROMPT}], max_tokens=max_tokens,
                temperature=0, stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
            arrivals, tokens = [], 0
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    arrivals.append(time.perf_counter())
                if chunk.usage is not None:
                    tokens = chunk.usage.completion_tokens
            if i == 0:
                continue
            tpots.append((arrivals[-1] - arrivals[0]) / max(1, tokens - 1))
            spans, gaps = spans + arrivals[-1] - arrivals[0], gaps + max(1, tokens - 1)
            ttfts.append(arrivals[0] - t0)
            chunks.append(len(arrivals))
        time.sleep(1.5)  # worker metrics move with the heartbeat
        steps1 = worker_decode_steps(step_urls)
    finally:
        client.close()
        group.stop()
    step_s = (steps1[0] - steps0[0]) / max(1.0, steps1[1] - steps0[1])
    tpot = spans / gaps  # pooled over every gap, like the worker's step mean it is compared with
    return {"tpot_s": tpot, "tpot_s_runs": tpots, "ttft_s": statistics.median(ttfts), "content_chunks": chunks,
            "tokens": max_tokens, "worker_step_s": step_s, "worker_steps": steps1[1] - steps0[1],
            "tpot_over_worker_step": tpot / step_s if step_s else None}


def plot(model: str, step_s: float, modes: dict[str, dict]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    names, values, colors = ["engine step\n(this process)"], [step_s * 1000], ["#888"]
    for mode, r in modes.items():
        names += [f"{mode}: worker's\ndecode step", f"{mode}: TPOT\n(client)"]
        values += [r["worker_step_s"] * 1000, r["tpot_s"] * 1000]
        colors += ["#9bd", "#36c"]
    ax.bar(names, values, color=colors)
    ax.set_ylabel("ms per output token (batch 1)")
    ax.set_title(f"TPOT through crescent up vs the engine's decode step ({model})")
    ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    return fig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default", help="model name or folder")
    parser.add_argument("--tiny", action="store_true", help="a tiny random model instead")
    parser.add_argument("--modes", default="disagg,agg")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3, help="measured requests per pass (after one warm-up)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the engine and of each worker")
    parser.add_argument("--timeout-s", type=float, default=120.0, help="bound on each request")
    parser.add_argument("--repo", default=str(Path(__file__).resolve().parents[2]),
                        help="checkout the cluster's processes run from (default: this one)")
    args = parser.parse_args()

    from crescent.models.prepare import make_tiny_model, prepare_model

    model_dir = Path(prepare_model(args.model)) if not args.tiny else \
        make_tiny_model(Path(tempfile.mkdtemp()) / "bench-tiny")
    engine = engine_step_time(model_dir, args.threads, args.max_tokens, args.runs)
    print(f"engine decode step: {engine['step_s'] * 1000:.2f} ms", flush=True)
    modes = {}
    for mode in args.modes.split(","):
        modes[mode] = r = cluster_tpot(model_dir, mode, args.threads, args.max_tokens, args.runs, args.timeout_s,
                                       Path(args.repo))
        r["tpot_over_step"] = r["tpot_s"] / engine["step_s"]
        print(f"{mode}: TPOT {r['tpot_s'] * 1000:.2f} ms = {r['tpot_over_step']:.3f} x engine step, "
              f"{r['tpot_over_worker_step'] or float('nan'):.3f} x its worker's step "
              f"({r['worker_step_s'] * 1000:.2f} ms over {r['worker_steps']:.0f} steps), "
              f"TTFT {r['ttft_s'] * 1000:.0f} ms, chunks {r['content_chunks']}", flush=True)
    model = "tiny" if args.tiny else model_dir.name
    config = {**vars(args), "model_dir": str(model_dir)}
    results = {"engine": engine, "modes": modes, "goal_tpot_over_step": 1.1,
               "meets_goal": {m: (r["tpot_over_worker_step"] or 99) <= 1.1 for m, r in modes.items()}}
    path = write_result("serving_tpot", config, results, plot(model, engine["step_s"], modes))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
