"""The same load through the whole cluster and through one in-process engine: tokens/s ratio and added TTFT.

    .venv/bin/python -m bench.serving.cluster_vs_engine --model default --requests 32 --max-tokens 16,32,64

Load: ``--requests`` chat requests sent at once (all concurrent), prompt lengths cycling through
``--prompt-words``, output lengths through ``--max-tokens`` (greedy, ignore_eos, so both sides generate exactly
the same tokens). Baseline: the engine in this process (AsyncEngine), prompts tokenized with the chat template.
Cluster: conductor, kvstore, prefill, decode and gateway as separate processes (free ports), driven through the
official openai client with streaming. The baseline runs first and is shut down before the cluster starts, so
the two never share the CPU. Bounded: ``--timeout-s`` per pass. Writes bench/results/serving_cluster_vs_engine.*.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path

from bench.results_io import write_result

WORDS = ("the river carries light across old stones while the town sleeps and a bell counts hours for nobody "
         "in particular except the baker who wakes early to knead bread").split()


def make_requests(n: int, prompt_words: list[int], max_tokens: list[int]) -> list[tuple[str, int]]:
    out = []
    for i in range(n):
        length = prompt_words[i % len(prompt_words)]
        text = " ".join(WORDS[(i + j) % len(WORDS)] for j in range(length))
        out.append((f"Request {i}. Summarize this: {text}", max_tokens[i % len(max_tokens)]))
    return out


def summary(ttfts: list[float], tokens: int, wall: float) -> dict:
    return {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall, "ttft_p50_s": statistics.median(ttfts),
            "ttft_mean_s": statistics.fmean(ttfts), "ttft_max_s": max(ttfts), "ttfts_s": ttfts}


# The engine configuration both sides run (only the thread count differs: one engine gets every core, each of the
# cluster's two workers half): prefix caching on, as a user of either would have it.
ENGINE = {"num_kv_blocks": 2048, "device": "cpu", "max_num_seqs": 64, "enable_prefix_caching": True}


# --- baseline: one engine, in this process --------------------------------------------------------------------
async def run_engine(model_dir: Path, requests: list[tuple[str, int]], threads: int, timeout_s: float) -> dict:
    from crescent.engine.async_engine import AsyncEngine
    from crescent.engine.llm_engine import LLMEngine
    from crescent.engine.sampling_params import SamplingParams
    from crescent.engine.settings import EngineSettings
    from crescent.models.tokenizer import Tokenizer

    settings = EngineSettings(model=str(model_dir), torch_threads=threads, **ENGINE)
    engine = AsyncEngine(LLMEngine.from_settings(settings)).start()
    tok = Tokenizer.from_dir(model_dir)

    async def one(i: int, text: str, max_tokens: int, t0: float) -> tuple[float, int]:
        ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": text}]))
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        first, count = None, 0
        async for out in engine.generate(f"bench-{i}-{t0}", ids, params):
            if first is None and out.new_token_ids:
                first = time.perf_counter() - t0
            count = out.completion_tokens
        return first or 0.0, count

    try:
        await one(-1, "warm up", 2, time.perf_counter())
        t0 = time.perf_counter()
        results = await asyncio.wait_for(asyncio.gather(*(one(i, t, m, t0) for i, (t, m) in enumerate(requests))),
                                         timeout_s)
        wall = time.perf_counter() - t0
    finally:
        engine.shutdown()
    return summary([r[0] for r in results], sum(r[1] for r in results), wall)


# --- the cluster, as separate processes ------------------------------------------------------------------------
async def drive_cluster(base_url: str, model: str, requests: list[tuple[str, int]], timeout_s: float) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="none", max_retries=0, timeout=timeout_s)

    async def one(text: str, max_tokens: int, t0: float) -> tuple[float, int]:
        stream = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": text}], max_tokens=max_tokens, temperature=0,
            stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        first, count = None, 0
        async for chunk in stream:
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = time.perf_counter() - t0
            if chunk.usage is not None:
                count = chunk.usage.completion_tokens
        return first or 0.0, count

    await one("warm up", 2, time.perf_counter())
    t0 = time.perf_counter()
    results = await asyncio.wait_for(asyncio.gather(*(one(t, m, t0) for t, m in requests)), timeout_s)
    wall = time.perf_counter() - t0
    await client.close()
    return summary([r[0] for r in results], sum(r[1] for r in results), wall)


def run_cluster(model_dir: Path, name: str, requests, worker_threads: int, timeout_s: float) -> dict:
    from crescent.services.common.launcher import free_port, plan_local_cluster, start_cluster

    worker = {"torch_threads": worker_threads, **ENGINE}
    extra = {"prefill": worker, "decode": worker, "conductor": {"rejection": "none", "max_queue_per_instance": 1024},
             "kvstore": {"ssd_capacity_bytes": 0, "dram_capacity_bytes": 1 << 30}}
    plan = plan_local_cluster(str(model_dir), name, gateway_port=free_port(), free_ports=True, extra=extra)
    repo = Path(__file__).resolve().parents[2]
    logs = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    group = start_cluster(plan, logs, {"PYTHONPATH": str(repo)}, timeout_s=600)
    try:
        return asyncio.run(drive_cluster(plan.gateway_url, name, requests, timeout_s))
    finally:
        group.stop()


def plot(engine: dict, cluster: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.bar(["engine (1 process)", "cluster (5 processes)"], [engine["tokens_per_s"], cluster["tokens_per_s"]],
          color=["#888", "#36c"])
    a.set_ylabel("generated tokens / s")
    a.set_title(f"throughput: cluster = {cluster['tokens_per_s'] / engine['tokens_per_s']:.0%} of engine")
    b.boxplot([engine["ttfts_s"], cluster["ttfts_s"]], tick_labels=["engine", "cluster"])
    b.set_ylabel("TTFT (s), all requests sent at t=0")
    b.set_title("time to first token")
    fig.tight_layout()
    return fig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default", help="model name or folder")
    parser.add_argument("--tiny", action="store_true", help="a tiny random model instead (smoke test)")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--prompt-words", default="20,80,200", help="prompt lengths (words), cycled")
    parser.add_argument("--max-tokens", default="16,32,64", help="output lengths, cycled")
    parser.add_argument("--engine-threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--worker-threads", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    parser.add_argument("--timeout-s", type=float, default=600.0, help="bound on each pass")
    args = parser.parse_args()

    from crescent.models.prepare import make_tiny_model, prepare_model

    model_dir = Path(prepare_model(args.model)) if not args.tiny else \
        make_tiny_model(Path(tempfile.mkdtemp()) / "bench-tiny")
    requests = make_requests(args.requests, [int(x) for x in args.prompt_words.split(",")],
                             [int(x) for x in args.max_tokens.split(",")])
    engine = asyncio.run(run_engine(model_dir, requests, args.engine_threads, args.timeout_s))
    print(f"engine : {engine['tokens_per_s']:.1f} tok/s, TTFT p50 {engine['ttft_p50_s']:.3f}s", flush=True)
    cluster = run_cluster(model_dir, model_dir.name, requests, args.worker_threads, args.timeout_s)
    print(f"cluster: {cluster['tokens_per_s']:.1f} tok/s, TTFT p50 {cluster['ttft_p50_s']:.3f}s", flush=True)
    ratio = cluster["tokens_per_s"] / engine["tokens_per_s"]
    added = cluster["ttft_p50_s"] - engine["ttft_p50_s"]
    print(f"ratio  : cluster/engine tokens/s = {ratio:.3f} (goal >= 0.80); TTFT added (p50) = {added * 1000:.0f} ms")
    config = {**vars(args), "model_dir": str(model_dir), "engine": ENGINE}
    results = {"engine": engine, "cluster": cluster, "tokens_per_s_ratio": ratio, "ttft_added_p50_s": added,
               "goal_ratio": 0.8, "meets_goal": ratio >= 0.8}
    path = write_result("serving_cluster_vs_engine", config, results, plot(engine, cluster))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
