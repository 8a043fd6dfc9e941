"""A bounded, mixed OpenAI load for a crescent cluster: what the dashboard PNG (deploy/grafana/dashboard.png) shows.

    # against a running cluster (every request on the given base URL; bounded by --duration-s and --max-requests):
    .venv/bin/python -m bench.serving.dashboard_load --base-url http://127.0.0.1:8000 --model default
    # or start a tiny cluster on free ports, scrape it with a local Prometheus (render.py record), drive the load,
    # and draw the panels from Prometheus:
    .venv/bin/python -m bench.serving.dashboard_load --launch --duration-s 240 --out deploy/grafana/dashboard.png

The mix: ``--concurrency`` client loops, each picking (seeded) a streaming chat request behind one of a few long
shared system prompts (prefix-cache and kvstore hits), a non-streaming chat with a unique prompt, a streaming
text completion, or a bad request (unknown model -> 404, invalid fields -> 400). Every ``--burst-every-s`` a burst
of ``--burst-size`` requests is sent at once; with a small conductor queue cap (``--launch`` sets it) some get 429.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import openai

REPO = Path(__file__).resolve().parents[2]
TOPICS = ("tides", "bread", "bells", "rivers", "lanterns", "orchards", "ferries", "glaciers", "kites", "clocks")
# Three long system prompts (many 16-token blocks each) that many requests share: prefix hits.
SYSTEMS = [f"You are assistant {k}. " + " ".join(f"Rule {i}: answer about {TOPICS[(i + k) % len(TOPICS)]} "
                                                  "briefly, politely and without inventing facts." for i in range(12))
           for k in range(3)]
KINDS = (("shared_stream", 0.45), ("unique_chat", 0.2), ("completion_stream", 0.2), ("bad", 0.15))


def _status(exc: BaseException) -> str:
    if isinstance(exc, openai.APIStatusError):
        return str(exc.status_code)
    return type(exc).__name__


async def _stream(gen) -> None:
    async for _ in await gen:
        pass


def _request(client: openai.AsyncOpenAI, model: str, kind: str, rng: random.Random, i: int):
    """The coroutine of one request of this kind."""
    chat = client.chat.completions.create
    question = f"Request {i}: tell me about {rng.choice(TOPICS)} and {rng.choice(TOPICS)}."
    max_tokens = rng.randint(8, 40)
    if kind == "shared_stream":
        messages = [{"role": "system", "content": rng.choice(SYSTEMS)}, {"role": "user", "content": question}]
        return _stream(chat(model=model, messages=messages, max_tokens=max_tokens, stream=True))
    if kind == "unique_chat":
        return chat(model=model, messages=[{"role": "user", "content": f"{i} {rng.random()} {question}"}],
                    max_tokens=max_tokens)
    if kind == "completion_stream":
        return _stream(client.completions.create(model=model, prompt=f"{i}. Once upon a time, {question}",
                                                 max_tokens=max_tokens, stream=True))
    bad = rng.randrange(3)
    if bad == 0:
        return chat(model=model + "-missing", messages=[{"role": "user", "content": question}], max_tokens=4)
    if bad == 1:
        return chat(model=model, messages=[{"role": "user", "content": question}], max_tokens=-3)
    return client.completions.create(model=model, prompt="", max_tokens=4)


class Tally:
    def __init__(self) -> None:
        self.counts: collections.Counter = collections.Counter()
        self.sent = 0

    async def run(self, kind: str, coro) -> None:
        self.sent += 1
        try:
            await coro
            self.counts[(kind, "200")] += 1
        except (openai.OpenAIError, httpx.HTTPError) as exc:
            self.counts[(kind, _status(exc))] += 1

    def summary(self) -> dict[str, int]:
        return {f"{k} {s}": n for (k, s), n in sorted(self.counts.items())}


async def drive(base_url: str, model: str, *, duration_s: float, concurrency: int = 3, max_requests: int = 5000,
                burst_every_s: float = 45.0, burst_size: int = 24, seed: int = 0,
                request_timeout_s: float = 60.0) -> dict[str, int]:
    """Send the mixed load until ``duration_s`` passes or ``max_requests`` were sent; returns counts by outcome."""
    http = httpx.AsyncClient(trust_env=False, timeout=request_timeout_s)  # loopback only: never a proxy
    client = openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="none", max_retries=0,
                                timeout=request_timeout_s, http_client=http)
    tally, rng = Tally(), random.Random(seed)
    deadline = time.monotonic() + duration_s
    kinds, weights = zip(*KINDS, strict=True)

    async def loop() -> None:
        while time.monotonic() < deadline and tally.sent < max_requests:
            kind = rng.choices(kinds, weights)[0]
            await tally.run(kind, _request(client, model, kind, rng, tally.sent))
            await asyncio.sleep(rng.uniform(0.0, 0.3))

    async def bursts() -> None:
        while True:
            await asyncio.sleep(burst_every_s)
            if time.monotonic() >= deadline or tally.sent >= max_requests:
                return
            await asyncio.gather(*(tally.run("burst", _request(client, model, "shared_stream", rng, tally.sent))
                                   for _ in range(burst_size)))

    try:
        burst_task = asyncio.create_task(bursts())
        await asyncio.gather(*(loop() for _ in range(concurrency)))
        burst_task.cancel()
        await asyncio.gather(burst_task, return_exceptions=True)
    finally:
        await client.close()
    return tally.summary()


# --- --launch: a tiny cluster, a local Prometheus scraping it while the load runs, then the PNG -----------------
def launch_tiny(logs: Path, queue_cap: int):
    """A tiny-model cluster on free ports (one prefill, one decode) with a small queue cap and a small store."""
    from crescent.models.prepare import make_tiny_model
    from crescent.services.common.launcher import free_port, plan_local_cluster, start_cluster
    from crescent.settings import default_model_cache

    model = default_model_cache() / "crescent-tiny"  # the same folder `crescent up --tiny` serves
    if not (model / "config.json").is_file():
        make_tiny_model(model)
    worker = {"torch_threads": 1, "num_kv_blocks": 256, "max_num_seqs": 16, "heartbeat_interval_s": 0.5,
              "device": "cpu"}
    # A DRAM tier of a few MB, so the tiny model's blocks fill it and demote to the SSD tier within minutes.
    extra = {"prefill": worker, "decode": worker,
             "conductor": {"heartbeat_interval_s": 0.5, "rejection": "none", "max_queue_per_instance": queue_cap},
             "kvstore": {"dram_capacity_bytes": 2 << 20, "ssd_capacity_bytes": 64 << 20,
                         "data_dir": str(logs / "ssd"), "heartbeat_interval_s": 0.5}}
    plan = plan_local_cluster(str(model), "crescent-tiny", gateway_port=free_port(), free_ports=True, extra=extra)
    env = {"PYTHONPATH": str(REPO), **{k: "" for k in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")}}
    return plan, start_cluster(plan, logs, env, timeout_s=300)


def record_argv(plan, data: Path, duration_s: float, interval_s: float, out: Path) -> list[str]:
    targets = [f"gateway={plan.gateway_url}/metrics"]
    for role in ("conductor", "kvstore", "prefill", "decode"):
        targets += [f"{role}={url}" for url in plan.metrics_urls(role)]
    argv = [sys.executable, str(REPO / "deploy/grafana/render.py"), "record", "--data", str(data),
            "--duration-s", str(duration_s), "--interval", str(interval_s), "--out", str(out)]
    for t in targets:
        argv += ["--target", t]
    return argv


def launched_run(args: argparse.Namespace) -> dict[str, int]:
    work = Path(tempfile.mkdtemp(prefix="dashboard-load-"))
    data = args.prometheus_data or work / "prometheus"
    plan, group = launch_tiny(work / "logs", args.queue_cap)
    print(f"cluster up at {plan.gateway_url}; logs and Prometheus data in {work}", flush=True)
    duration = args.duration_s + 2 * args.idle_s
    recorder = subprocess.Popen(record_argv(plan, data, duration, args.scrape_interval_s, args.out))
    try:
        time.sleep(args.idle_s + 10)  # Prometheus' first scrapes (it applies targets every 5 s), then a quiet lead-in
        summary = asyncio.run(drive(plan.gateway_url, "crescent-tiny", duration_s=args.duration_s,
                                    concurrency=args.concurrency, max_requests=args.max_requests,
                                    burst_every_s=args.burst_every_s, burst_size=args.burst_size, seed=args.seed))
        recorder.wait(timeout=duration + 180)  # the rest of the quiet tail, then the plot
    finally:
        if recorder.poll() is None:
            recorder.kill()
        group.stop()
    if recorder.returncode != 0:
        raise SystemExit(f"render.py record failed ({recorder.returncode}); Prometheus log in {data}")
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base-url", default="", help="gateway URL of a running cluster (without --launch)")
    p.add_argument("--model", default="default", help="model id to send (without --launch)")
    p.add_argument("--launch", action="store_true", help="start a tiny cluster, scrape it, plot --out")
    p.add_argument("--duration-s", type=float, default=180.0)
    p.add_argument("--max-requests", type=int, default=5000)
    p.add_argument("--concurrency", type=int, default=3)
    p.add_argument("--burst-every-s", type=float, default=45.0)
    p.add_argument("--burst-size", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--queue-cap", type=int, default=4, help="--launch: conductor max_queue_per_instance")
    p.add_argument("--scrape-interval-s", type=float, default=5.0, help="--launch")
    p.add_argument("--idle-s", type=float, default=20.0, help="--launch: quiet time before and after the load")
    p.add_argument("--prometheus-data", type=Path, default=None,
                   help="--launch: Prometheus' folder, kept to redraw with render.py plot --data (default: a temp one)")
    p.add_argument("--out", type=Path, default=REPO / "deploy/grafana/dashboard.png", help="--launch: the PNG")
    args = p.parse_args(argv)
    if args.launch:
        summary = launched_run(args)
    elif args.base_url:
        summary = asyncio.run(drive(args.base_url.rstrip("/"), args.model, duration_s=args.duration_s,
                                    concurrency=args.concurrency, max_requests=args.max_requests,
                                    burst_every_s=args.burst_every_s, burst_size=args.burst_size, seed=args.seed))
    else:
        p.error("give --base-url (a running cluster) or --launch")
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
