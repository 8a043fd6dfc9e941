"""The trace suite end to end on tiny sizes, its goal checks, and why ``predicted`` once equalled ``load``."""

from __future__ import annotations

import dataclasses

from bench.serving import trace_gen
from bench.serving.sim_hardware import MeasuredHardware, Samples
from bench.serving.sim_run import POLICIES, REJECTIONS, run_one
from bench.serving.trace_suite import (
    INPUT_DIVISOR,
    OUTPUT_DIVISOR,
    PLANNER,
    SAMPLES,
    SUITE,
    base_config,
    run_suite,
)
from bench.serving.trace_suite_goals import goal_checks
from crescent.services.conductor.cost_model import CostModel


def _run(trace, **overrides) -> dict:
    planner = CostModel.load(PLANNER)
    hardware = MeasuredHardware.from_samples(planner, Samples.load(SAMPLES), seed=0)
    return run_one(trace, base_config(hardware, planner), **overrides)


def test_every_policy_and_mode_runs_on_every_trace():
    out = run_suite(40, (1.0,), traces=tuple(SUITE))
    for entry in out["traces"].values():
        grid = entry["loads"]["1.0"]
        assert set(grid) == {f"{p}/{r}" for p in POLICIES for r in REJECTIONS}
        assert all(row["requests"] == 40 for row in grid.values())
    assert set(out["goals"]) == {"points", "summary", "misses"}


def test_goal_checks_count_only_overloaded_points_and_list_misses():
    def row(good, rejected=0, attainment=None):
        return {"good": good, "rejected": rejected, "slo_attainment": good / 100 if attainment is None else attainment,
                "rejected_by_reason": {}}

    grid = {f"{p}/{r}": row(50) for p in POLICIES for r in REJECTIONS}
    grid["mooncake/load"], grid["mooncake/predicted"] = row(70, rejected=20), row(72, rejected=10)
    light = {f"{p}/{r}": row(100) for p in POLICIES for r in REJECTIONS}
    goals = goal_checks({"t": {"long_context": True, "loads": {"1.0": light, "2.0": grid}}})
    assert not goals["points"]["t"]["1.0"]["overloaded"] and goals["points"]["t"]["2.0"]["overloaded"]
    assert goals["summary"]["predicted rejects >= 10% fewer than load at >= attainment"] == "1/1 overloaded points"
    assert goals["summary"]["mooncake >= 1.2x round_robin"] == "2/3 overloaded points"  # none: 50 vs 50
    assert any("x2.0: mooncake >= 1.2x round_robin (none)" in m for m in goals["misses"])


def test_predicted_equals_load_where_only_ttft_rejects_and_engages_where_decode_binds():
    """The audit saw identical counts from ``load`` and ``predicted``: both share the TTFT check, and only the
    decode check differs. A prefill-bound point rejects on TTFT alone, so the modes cannot differ there."""
    conversation = trace_gen.scale_tokens(SUITE["conversation"].build(200), INPUT_DIVISOR, OUTPUT_DIVISOR)
    prefill_bound = {m: _run(trace_gen.speed_up(conversation, 2.0), policy="mooncake", rejection=m,
                             n_decode=6) for m in ("load", "predicted")}
    assert set(prefill_bound["load"]["rejected_by_reason"]) == {"ttft_slo"}
    assert prefill_bound["load"]["rejected_by_reason"] == prefill_bound["predicted"]["rejected_by_reason"]
    oscillating = trace_gen.scale_tokens(SUITE["oscillating_decode"].build(300), INPUT_DIVISOR, OUTPUT_DIVISOR)
    decode_bound = {m: _run(trace_gen.speed_up(oscillating, 2.0), policy="mooncake", rejection=m)
                    for m in ("load", "predicted")}
    assert decode_bound["load"]["rejected_by_reason"].get("tbt_slo", 0) > 0
    assert decode_bound["predicted"]["rejected_by_reason"].get("tbt_slo", 0) > 0
    assert decode_bound["load"]["rejected"] != decode_bound["predicted"]["rejected"]


def test_the_suite_cluster_has_hardware_apart_from_the_planner():
    planner = CostModel.load(PLANNER)
    hardware = MeasuredHardware.from_samples(planner, Samples.load(SAMPLES), seed=0)
    cfg = base_config(hardware, planner)
    assert cfg.cost is planner and cfg.true_cost is hardware
    assert dataclasses.replace(cfg, rejection="predicted").true_cost is hardware
