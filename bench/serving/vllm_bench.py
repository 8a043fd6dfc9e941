"""Driving `vllm bench serve` against one OpenAI server: the scenarios, one run, and every run on one server.

Each run is `vllm bench serve --backend openai` (/v1/completions, streaming, ignore_eos, temperature 0); its saved
JSON is reduced to the numbers we keep. Against crescent's gateway, the gateway's counters are read before and
after each run (bench/serving/gateway_metrics.py), so a run's failed requests come with their reasons.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench.serving import gateway_metrics
from bench.serving.servers import Server

KEPT = ("completed", "failed", "duration", "total_input_tokens", "total_output_tokens", "request_throughput",
        "output_throughput", "total_token_throughput", "mean_ttft_ms", "median_ttft_ms", "p90_ttft_ms",
        "p99_ttft_ms", "mean_tpot_ms", "median_tpot_ms", "p90_tpot_ms", "p99_tpot_ms", "median_itl_ms",
        "p99_itl_ms", "median_e2el_ms", "p99_e2el_ms", "max_concurrent_requests")


@dataclass(frozen=True)
class Scenario:
    name: str
    kind: str  # "random" or "prefix": which systems run it and which goals apply (vs_vllm_goals.py)
    dataset_args: tuple[str, ...]
    concurrency: int


def scenarios(concurrencies: list[int]) -> list[Scenario]:
    """random 256 in / 64 out, and prefix_repetition (4 prefixes of 768 tokens, suffix 64, 32 out), at each
    concurrency."""
    random = ("--dataset-name", "random", "--random-input-len", "256", "--random-output-len", "64")
    prefix = ("--dataset-name", "prefix_repetition", "--prefix-repetition-num-prefixes", "4",
              "--prefix-repetition-prefix-len", "768", "--prefix-repetition-suffix-len", "64",
              "--prefix-repetition-output-len", "32")
    return [*(Scenario(f"random_256_64_c{c}", "random", random, c) for c in concurrencies),
            *(Scenario(f"prefix_rep_4x768_c{c}", "prefix", prefix, c) for c in concurrencies)]


def chosen_scenarios(concurrency: str, wanted: str) -> list[Scenario]:
    """The scenarios ``--concurrency 8,32 --scenarios NAMES|all`` ask for; ValueError naming the known ones."""
    try:
        every = scenarios([int(c) for c in concurrency.split(",")])
    except ValueError:
        raise ValueError(f"--concurrency wants comma-separated integers, got {concurrency!r}") from None
    if wanted == "all":
        return every
    names = set(wanted.split(","))
    todo = [sc for sc in every if sc.name in names]
    if len(todo) < len(names):
        unknown = sorted(names - {sc.name for sc in every})
        raise ValueError(f"no scenario named {', '.join(unknown)}; names: "
                         + ", ".join(sc.name for sc in every))
    return todo


def bench_argv(vllm_bin: Path, server: Server, model_dir: Path, served_name: str, sc: Scenario, args,
               result_dir: Path, filename: str) -> list[str]:
    return [str(vllm_bin), "bench", "serve", "--backend", "openai", "--base-url", server.base_url,
            "--endpoint", "/v1/completions", "--model", served_name, "--tokenizer", str(model_dir),
            *sc.dataset_args, "--num-prompts", str(args.num_prompts), "--max-concurrency", str(sc.concurrency),
            "--num-warmups", str(args.warmups), "--ignore-eos", "--temperature", "0", "--seed", str(args.seed),
            "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,90,99", "--disable-tqdm",
            "--save-result", "--save-detailed", "--result-dir", str(result_dir), "--result-filename", filename]


def run_bench(vllm_bin: Path, server: Server, model_dir: Path, served_name: str, sc: Scenario, args,
              work: Path, label: str) -> dict:
    """One `vllm bench serve` run; its saved JSON reduced to the numbers we keep (plus the distinct errors)."""
    filename = f"{label}.json"
    argv = bench_argv(vllm_bin, server, model_dir, served_name, sc, args, work, filename)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    t0 = time.perf_counter()
    with open(work / f"{label}.log", "wb") as log:
        proc = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=args.bench_timeout_s,
                              check=False)
    if proc.returncode != 0 or not (work / filename).is_file():
        tail = (work / f"{label}.log").read_text(errors="replace").splitlines()[-20:]
        raise RuntimeError(f"vllm bench serve exited {proc.returncode} for {label}:\n" + "\n".join(tail))
    raw = json.loads((work / filename).read_text())
    kept = {k: raw.get(k) for k in KEPT}
    kept["errors"] = sorted({e for e in raw.get("errors") or [] if e})[:5]
    kept["wall_s"] = time.perf_counter() - t0
    return kept


def _read_gateway(server: Server) -> gateway_metrics.Reading | str:
    """The gateway's counters, or why they could not be read (kept in the run instead of failing it)."""
    try:
        return gateway_metrics.scrape(server.base_url)
    except (httpx.HTTPError, ValueError) as exc:
        return f"{type(exc).__name__}: {exc}"


def measured_run(vllm_bin: Path, server: Server, model_dir: Path, served_name: str, sc: Scenario, args,
                 work: Path, label: str) -> dict:
    """run_bench, and for a crescent server the gateway's counters it moved (``gateway``) with the failed
    requests they do not account for (``unexplained_failed``)."""
    before = _read_gateway(server) if server.gateway_metrics else None
    try:
        kept = run_bench(vllm_bin, server, model_dir, served_name, sc, args, work, label)
    except (RuntimeError, subprocess.TimeoutExpired) as exc:  # kept as a failed run; the rest go on
        kept = {**{k: None for k in KEPT}, "bench_error": str(exc)}
    if before is None:
        return kept
    after = _read_gateway(server)
    if isinstance(before, str) or isinstance(after, str):
        kept["gateway"] = {"error": before if isinstance(before, str) else after}
    else:
        kept["gateway"] = gateway_metrics.difference(before, after)
        kept["unexplained_failed"] = gateway_metrics.unexplained(kept["failed"], kept["gateway"])
    return kept


def _summary(run: dict) -> str:
    if run.get("bench_error"):
        return run["bench_error"]
    text = (f"{run['output_throughput']:.1f} out tok/s, median TTFT {run['median_ttft_ms']:.0f} ms, median TPOT "
            f"{run['median_tpot_ms']:.1f} ms, failed {run['failed']} of {run['completed'] + run['failed']}")
    gateway = run.get("gateway") or {}
    if gateway.get("rejections") or gateway.get("error"):
        text += f"; gateway: {gateway.get('rejections') or gateway.get('error')}"
    return text


def serve_and_bench(server: Server, vllm_bin: Path, model_dir: Path, served_name: str, todo: list[Scenario],
                    args, work: Path) -> list[dict]:
    """Start one server, run every scenario ``--repeats`` times against it, stop it (always)."""
    server.start(args.start_timeout_s)
    print(f"{server.name}: healthy after {server.started_s:.0f}s on {server.base_url}", flush=True)
    runs = []
    try:
        for repeat in range(args.repeats):
            for sc in todo:
                run = {"system": server.name, "scenario": sc.name, "repeat": repeat,
                       "server_start_s": server.started_s}
                run.update(measured_run(vllm_bin, server, model_dir, served_name, sc, args, work,
                                        f"{server.name}-{sc.name}-{repeat}"))
                runs.append(run)
                print(f"  {sc.name} #{repeat}: {_summary(run)}", flush=True)
    finally:
        server.stop(args.stop_timeout_s)
    return runs
