"""The vs-vLLM benchmark's systems, scenarios, ratios and goals (no server needed)."""

from __future__ import annotations

import pytest

from bench.serving.vllm_bench import chosen_scenarios, scenarios
from bench.serving.vs_vllm_goals import compare, system, systems


def test_scenarios_are_the_issue_s_four():
    names = [sc.name for sc in scenarios([8, 32])]
    assert names == ["random_256_64_c8", "random_256_64_c32", "prefix_rep_4x768_c8", "prefix_rep_4x768_c32"]
    prefix = scenarios([8])[1]
    args = dict(zip(prefix.dataset_args[::2], prefix.dataset_args[1::2], strict=True))
    assert args == {"--dataset-name": "prefix_repetition", "--prefix-repetition-num-prefixes": "4",
                    "--prefix-repetition-prefix-len": "768", "--prefix-repetition-suffix-len": "64",
                    "--prefix-repetition-output-len": "32"}
    assert prefix.kind == "prefix" and prefix.concurrency == 8


def test_chosen_scenarios_by_name():
    assert [sc.name for sc in chosen_scenarios("2", "random_256_64_c2")] == ["random_256_64_c2"]
    with pytest.raises(ValueError, match="no scenario named random_256_64_c9; names: random_256_64_c8"):
        chosen_scenarios("8", "random_256_64_c8,random_256_64_c9")


def test_systems_per_engine():
    agg, disagg, two = systems("vllm", "agg,disagg,agg-2w")
    assert (agg.mode, agg.workers, [g.name for g in agg.goals]) == ("agg", 1, ["output_tok_s_ge_0.95x"])
    assert (disagg.name, disagg.goals) == ("crescent-vllm-disagg", ())
    assert (two.workers, two.kinds, [g.name for g in two.goals]) == (2, ("prefix",), ["median_ttft_le_0.7x"])
    own = system("crescent", "agg")
    assert own.name == "crescent-agg" and own.kinds == ("random", "prefix") and len(own.goals) == 4


def _run(system: str, scenario: str, tok_s: float | None, ttft: float | None, tpot: float | None, failed: int = 0,
         repeat: int = 0, **extra):
    return {"system": system, "scenario": scenario, "repeat": repeat, "output_throughput": tok_s,
            "median_ttft_ms": ttft, "median_tpot_ms": tpot, "failed": failed, **extra}


def test_compare_ratios_and_goals_of_crescent_s_engine():
    todo = scenarios([8])
    runs = [_run("vllm", "random_256_64_c8", 100, 200, 50), _run("vllm", "prefix_rep_4x768_c8", 100, 100, 50),
            _run("crescent-disagg", "random_256_64_c8", 120, 150, 40),
            _run("crescent-disagg", "random_256_64_c8", 80, 250, 60, repeat=1),  # median of two repeats
            _run("crescent-disagg", "prefix_rep_4x768_c8", 110, 80, 45, failed=1)]
    out = compare(runs, todo, [system("crescent", "disagg")])
    rnd = out["crescent-disagg/random_256_64_c8"]
    assert rnd["ratio_vs_vllm"] == pytest.approx({"output_throughput": 1.0, "median_ttft_ms": 1.0,
                                                  "median_tpot_ms": 1.0})
    assert rnd["meets_all"] and rnd["goals"]["median_ttft_le_1.0x"]
    pre = out["crescent-disagg/prefix_rep_4x768_c8"]
    assert pre["goals"] == {"output_tok_s_ge_1.0x": True, "median_ttft_le_0.7x": False,
                            "median_tpot_le_1.0x": True, "zero_failed": False}
    assert not pre["meets_all"]


def test_compare_vllm_engine_goals_and_failure_reasons():
    todo = scenarios([8])
    gateway = {"outcomes": {"completions/ok": 6, "completions/rejected": 2}, "rejections": {"ttft_slo": 2}}
    runs = [_run("vllm", "random_256_64_c8", 100, 200, 50), _run("vllm", "prefix_rep_4x768_c8", 100, 100, 50),
            _run("crescent-vllm-agg", "random_256_64_c8", 96, 300, 60),
            _run("crescent-vllm-agg", "prefix_rep_4x768_c8", 94, 60, 50, failed=2, gateway=gateway),
            _run("crescent-vllm-agg-2w", "prefix_rep_4x768_c8", 90, 69, 50)]
    out = compare(runs, todo, systems("vllm", "agg,agg-2w"))
    assert set(out) == {"crescent-vllm-agg/random_256_64_c8", "crescent-vllm-agg/prefix_rep_4x768_c8",
                        "crescent-vllm-agg-2w/prefix_rep_4x768_c8"}  # two workers: prefix_repetition only
    assert out["crescent-vllm-agg/random_256_64_c8"]["goals"] == {"output_tok_s_ge_0.95x": True, "zero_failed": True}
    agg_prefix = out["crescent-vllm-agg/prefix_rep_4x768_c8"]
    assert agg_prefix["goals"] == {"output_tok_s_ge_0.95x": False, "zero_failed": False}
    assert agg_prefix["failure_reasons"] == {"completions/rejected": 2, "rejected:ttft_slo": 2}
    assert out["crescent-vllm-agg-2w/prefix_rep_4x768_c8"]["goals"] == {"median_ttft_le_0.7x": True,
                                                                         "zero_failed": True}


def test_compare_skips_a_side_without_finished_runs():
    runs = [_run("crescent-disagg", "random_256_64_c8", 1, 1, 1),
            {**_run("vllm", "random_256_64_c8", None, None, None), "bench_error": "exited 1"}]
    assert compare(runs, scenarios([8])[:1], [system("crescent", "disagg")]) == {}


def test_readme_rows_read_what_compare_writes():
    from bench.report import render_row
    from bench.report_rows import ROWS

    todo = scenarios([8])
    runs = [_run("vllm", "random_256_64_c8", 100, 200, 50), _run("vllm", "prefix_rep_4x768_c8", 100, 100, 50,
                                                                  failed=5),
            _run("crescent-vllm-agg", "random_256_64_c8", 96, 300, 60),
            _run("crescent-vllm-agg", "prefix_rep_4x768_c8", 94, 60, 50, failed=2),
            _run("crescent-vllm-disagg", "random_256_64_c8", 80, 300, 60),
            _run("crescent-vllm-agg-2w", "prefix_rep_4x768_c8", 90, 69, 50, failed=1)]
    results = {"runs": runs, "comparison": compare(runs, todo, systems("vllm", "agg,disagg,agg-2w"))}
    run = {"commit": "1" * 40, "dirty": False, "partial": False, "created_at": "2026-12-02T10:00:00Z",
           "config": {"engine": "vllm", "concurrency": "8"}, "config_key": "k", "machine": {}, "results": results}
    row = next(r for r in ROWS if r.source == "serving_vllm_engine_vs_vllm" and "concurrency 8" in r.area)
    line = render_row(row, [run])
    assert ("agg output tok/s, random **0.96x** met; prefix **0.94x** **missed**; 2 workers prefix TTFT "
            "**0.69x** met; disagg output tok/s, random **0.80x**; crescent's failed requests **3** **missed**") in line
    other = next(r for r in ROWS if r.source == "serving_vllm_engine_vs_vllm" and "concurrency 32" in r.area)
    assert "never run" not in line and "not quoted" in render_row(other, [run])
