"""Simulator sanity on tiny synthetic traces (the real trace runs live in bench/serving/sim_run.py)."""

from __future__ import annotations

import pytest

from bench.serving.sim import SimConfig, simulate
from bench.serving.sim_cluster import fast25_tbt
from bench.serving.sim_metrics import ideal_hit_rate, summarize
from bench.serving.trace import TraceRequest, parse_line, synthetic_trace
from crescent.services.conductor.cost_model import CostModel

# Small and fast: 20 us per prefill token, 10 ms per decode step (+ a little per sequence).
COST = CostModel(prefill_s=(0.001, 2e-5, 0.0), decode_step_s=(0.01, 1e-4, 0.0))


def _cfg(**kw) -> SimConfig:
    base = dict(n_prefill=2, n_decode=2, prefill_cache_blocks=64, store_dram_blocks=64, store_ssd_blocks=256,
                decode_kv_tokens=200_000, ttft_slo_s=1.0, tbt_slo_s=0.05, cost=COST)
    return SimConfig(**(base | kw))


def test_a_lone_request_takes_exactly_the_modelled_time():
    trace = [TraceRequest(0.0, 1000, 5, (1,))]
    [rec] = simulate(trace, _cfg(heartbeat_interval_s=0))
    assert rec.finished and rec.cached_tokens == 0
    assert rec.ttft_s == pytest.approx(COST.prefill_time(1000))
    # 4 decode steps of one sequence; each step costs d0 + d1 * batch.
    assert rec.tbt_s == pytest.approx(0.0101) and rec.finish_s == pytest.approx(rec.ttft_s + 4 * 0.0101)


def test_a_repeated_prefix_is_reused_from_cache():
    trace = [TraceRequest(0.0, 1100, 2, (1, 2, 3)), TraceRequest(5.0, 1100, 2, (1, 2, 3))]
    first, second = simulate(trace, _cfg(policy="cache_aware"))
    assert first.cached_tokens == 0 and second.cached_tokens == 1024
    assert second.ttft_s < first.ttft_s


@pytest.mark.parametrize("policy", ["round_robin", "least_loaded", "cache_aware", "mooncake"])
def test_light_load_meets_the_slos_under_every_policy(policy):
    trace = synthetic_trace(40, rate_per_s=5.0, seed=1)
    cfg = _cfg(policy=policy, rejection="predicted")
    out = summarize(simulate(trace, cfg), cfg, trace[-1].arrival_s)
    assert out["finished"] == out["requests"] == 40
    assert out["slo_attainment"] == 1.0 and out["wasted_prefill_tokens"] == 0
    assert 0 < out["prefix_hit_rate"] <= ideal_hit_rate(trace) + 1e-4  # summarize rounds to 4 places


def test_overload_early_rejection_saves_prefill_work():
    trace = synthetic_trace(150, rate_per_s=200.0, seed=2)
    results = {}
    for mode in ("none", "predicted"):
        # a TTFT SLO the burst's prefill queue breaks (with the default 1 s, the queue cap alone keeps it)
        cfg = _cfg(policy="mooncake", rejection=mode, n_decode=1, ttft_slo_s=0.5)
        results[mode] = summarize(simulate(trace, cfg), cfg, trace[-1].arrival_s)
    assert results["none"]["wasted_prefill_tokens"] > 0
    assert results["predicted"]["rejected"] > 0
    assert results["predicted"]["wasted_prefill_tokens"] < results["none"]["wasted_prefill_tokens"]
    assert results["predicted"]["good"] >= results["none"]["good"]


def test_fast25_tbt_is_the_mean_of_the_slowest_tenth():
    assert fast25_tbt([0.01] * 18 + [0.5, 0.3]) == pytest.approx(0.4)
    assert fast25_tbt([0.2, 0.1]) == pytest.approx(0.2)
    assert fast25_tbt([]) == 0.0


def test_trace_lines_are_checked():
    assert parse_line('{"timestamp": 1500, "input_length": 600, "output_length": 3, "hash_ids": [7, 8]}') == \
        TraceRequest(1.5, 600, 3, (7, 8))
    with pytest.raises(ValueError, match="line 4"):
        parse_line('{"timestamp": 0}', 4)
