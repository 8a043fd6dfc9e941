"""The pieces of the simulator-vs-live check that run without a cluster: trace scaling, overhead folding, prefill
batching in the simulator, calibration samples, the measured cost model file, the CLI alias."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.serving.replay import ReplayResult
from bench.serving.sim import SimConfig, simulate
from bench.serving.sim_vs_live import corrected, overheads, scale_trace
from bench.serving.trace import TraceRequest
from crescent.services.conductor.calibrate import calibrate_with_samples, fit_problems
from crescent.services.conductor.cost_model import CostModel
from tests.unit.services.conductor.helpers import SyntheticEngine

COST = CostModel(prefill_s=(0.01, 1e-4, 0.0), decode_step_s=(0.02, 1e-3, 0.0), kv_bytes_per_token=4096)
MEASURED = Path(__file__).resolve().parents[3] / "bench" / "serving" / "cost_models" / "tiny_l4_h256_cpu.json"


def test_scale_trace_keeps_block_identity_and_caps_lengths():
    trace = [TraceRequest(1.5, 6758, 500, tuple(range(14))), TraceRequest(3.0, 300, 4, (0, 99))]
    a, b = scale_trace(trace, block_tokens=16, max_blocks=8, max_output=16)
    assert (a.arrival_s, a.input_length, a.output_length, a.hash_ids) == (1.5, 128, 16, tuple(range(8)))
    assert (b.input_length, b.output_length, b.hash_ids) == (32, 4, (0, 99))
    assert a.full_block_hashes(16) == a.hash_ids  # every scaled block is full: all of it is shareable


def test_overheads_are_live_minus_predicted_and_fold_into_the_fixed_costs():
    warmup = ReplayResult(0, 128, ok=True, ttft_s=5.0, gaps_s=[1.0, 1.0, 1.0])
    probes = [warmup] + [ReplayResult(i, 128, ok=True, ttft_s=COST.prefill_time(128) + 0.05,
                                      gaps_s=[0.04] + [COST.decode_step_time(1, 129) + 0.003] * 5) for i in (1, 2, 3)]
    over = overheads(probes, COST, 128)
    assert over["request_overhead_s"] == pytest.approx(0.05)
    assert over["token_overhead_s"] == pytest.approx(0.003, abs=1e-9)
    fixed = corrected(COST, over)
    assert fixed.prefill_time(64) == pytest.approx(COST.prefill_time(64) + 0.05)
    assert fixed.decode_step_time(4, 100) == pytest.approx(COST.decode_step_time(4, 100) + 0.003)
    assert COST.prefill_s[0] == 0.01  # the calibrated model itself is left alone
    assert over["probe_first_gap_s"] == pytest.approx(0.04)
    with pytest.raises(RuntimeError, match="no probe"):
        overheads([warmup, ReplayResult(1, 128, status="429")], COST, 128)


def test_the_kv_fetch_latency_fit_recovers_the_one_the_burst_was_simulated_with():
    from bench.serving.sim_vs_live import fit_kv_load_latency, parse_args, sim_config

    args = parse_args(["--cost-model", "unused.json", "--probe-tokens", "64", "--max-output", "8"])
    truth = corrected(COST, {"request_overhead_s": 0.0, "token_overhead_s": 0.0, "kv_load_latency_s": 0.012})
    trace = [TraceRequest(0.0, 64, 8, (-1 - i,)) for i in range(6)]
    records = simulate(trace, sim_config(args, truth, "cache_aware", decode_loads_kv=True))
    burst = [ReplayResult(r.index, 64, ok=True, tbt_s=r.tbt_s, gaps_s=[r.tbt_s]) for r in records]
    assert fit_kv_load_latency(burst, COST, args) == pytest.approx(0.012)


def _burst(n: int) -> list[TraceRequest]:
    return [TraceRequest(0.0, 160, 4, (10 * i, 10 * i + 1)) for i in range(n)]


def test_batched_prefill_costs_the_same_total_but_every_request_gets_its_token_at_the_end():
    base = dict(n_prefill=1, n_decode=1, block_tokens=16, heartbeat_interval_s=0, cost=COST)
    serial = simulate(_burst(5), SimConfig(**base))
    batched = simulate(_burst(5), SimConfig(**base, prefill_batch_tokens=2048))
    one = COST.prefill_time(160)
    assert sorted(r.ttft_s for r in serial) == pytest.approx([one * k for k in range(1, 6)])
    # The first arrival finds the instance idle and starts alone; the four queued behind it go as one batch.
    assert [r.ttft_s for r in batched] == pytest.approx([one] + [5 * one] * 4)
    small = simulate(_burst(5), SimConfig(**base, prefill_batch_tokens=320))  # two prompts fit a batch
    assert [r.ttft_s for r in small] == pytest.approx([one] + [3 * one] * 2 + [5 * one] * 2)
    assert all(r.finished for r in serial + batched + small)


def test_calibration_reports_each_point_and_best_of_n_is_supported():
    model, samples = calibrate_with_samples(SyntheticEngine, repeats=3, statistic="min")
    assert len(samples["prefill"]) == 7 and len(samples["decode"]) == 7
    for row in samples["prefill"] + samples["decode"]:
        assert row["fitted_s"] == pytest.approx(row["measured_s"], rel=0.05)
    assert fit_problems(model) == []
    assert fit_problems(CostModel(prefill_s=(0.01, 0.0, 0.0), decode_step_s=(0.02, 0.0, 0.0))) != []
    with pytest.raises(ValueError, match="statistic"):
        calibrate_with_samples(SyntheticEngine, statistic="mean")


def test_the_measured_cost_model_file_is_sane():
    model = CostModel.load(MEASURED)
    assert "calibrated" in model.source and fit_problems(model) == []
    assert model.prefill_time(256) > model.prefill_time(64) > 0
    assert model.decode_step_time(16, 16 * 256) > model.decode_step_time(1, 256) > 0


@pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")  # runpy: replay was imported above
def test_cli_bench_runs_a_script_by_its_bare_name(capsys):
    from crescent import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", "replay", "--help"])
    assert exit_info.value.code == 0
    assert "--base-url" in capsys.readouterr().out
    assert cli.main(["bench", "no_such_bench"]) == 2


def test_spread_counts_passes_within_25_percent_per_variant():
    from bench.serving.sim_vs_live import spread

    def one(live_ttft: float, ratio: float) -> dict:
        r = {"ttft_p50_sim_over_live": ratio, "tbt_p50_sim_over_live": None}
        return {"live": {"ttft_s": {"p50": live_ttft}, "tbt_s": {"p50": 0.05}}, "sim_over_live": {"calibrated": r}}

    out = spread({"a": one(0.5, 1.1), "b": one(1.0, 1.3)})
    assert out["ttft"]["live_p50_max_over_min"] == 2.0
    assert out["ttft"]["calibrated"] == {"sim_over_live_p50": [1.1, 1.3], "passes_within_25pct": 1}
    assert out["tbt"]["calibrated"]["passes_within_25pct"] == 0  # no ratio (no live TBT) never counts as agreement
