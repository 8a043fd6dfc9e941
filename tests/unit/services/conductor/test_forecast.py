"""The decode forecast (forecast.py) for the moment a request reaches decode, and what the ledger learns from
finishes."""

from __future__ import annotations

import dataclasses

import pytest

from crescent.services.conductor.cluster import Role, Slo
from crescent.services.conductor.forecast import decode_at
from crescent.services.conductor.ledger import MIN_GAPS_TO_LEARN, InFlight, Ledger
from crescent.services.conductor.policies import cache_aware, mooncake
from crescent.services.conductor.rejection import check_admission

from .helpers import COST, inst, request, view


def _inflight(rid: str, decode: str, start: float, predicted_tbt_s: float = 0.01) -> InFlight:
    return InFlight(rid, "p0", decode, prompt_tokens=1000, new_prefill_tokens=1000, expected_output=100,
                    placed_at=0.0, decode_start=start, predicted_tbt_s=predicted_tbt_s)


def test_the_forecast_sees_the_load_at_arrival_that_the_last_report_misses():
    # d0 reports 40 running, all of them done by the time this request leaves prefill; d1 reports nothing,
    # but 30 admitted prefills land on it first. The last report favours d1; the forecast favours d0.
    ledger = Ledger()
    for i in range(40):
        ledger.add(_inflight(f"old{i}", "d0", start=-10.0, predicted_tbt_s=10.01 / 100))  # last token at 0.01 s
    for i in range(30):
        ledger.add(_inflight(f"new{i}", "d1", start=0.001))
    decode = [inst("d0", Role.DECODE, running=40, running_context_tokens=40_000), inst("d1", Role.DECODE)]
    v = view([inst("p0", Role.PREFILL)], decode, ledger=ledger)
    (tbt_d0, _), (tbt_d1, _) = (decode_at(v, d, request(1), arrival=0.1) for d in decode)
    assert tbt_d0 == pytest.approx(COST.decode_step_time(1, 17))  # all 40 released
    assert tbt_d1 == pytest.approx(COST.decode_step_time(31, 30 * 1000 + 17))  # 30 landed
    # Placement stays on current load (policies.pick_decode_with_triage says why); admission uses the forecast.
    assert cache_aware(v, request(1)).decode.instance_id == "d1"
    assert mooncake(v, request(1)).decode.instance_id == "d1"


def test_the_ledger_learns_how_far_the_planner_misses_the_step_time():
    ledger = Ledger(ema_weight=0.5)
    ledger.add(_inflight("short", "d0", 0.0, predicted_tbt_s=0.01))
    ledger.finish("short", completion_tokens=MIN_GAPS_TO_LEARN - 1, mean_tbt_s=0.05)
    assert ledger.tbt_correction == 1.0  # a few gaps are mostly the first, join-waiting one: not learnt
    ledger.add(_inflight("long", "d0", 0.0, predicted_tbt_s=0.01))
    ledger.finish("long", completion_tokens=100, mean_tbt_s=0.02)
    assert ledger.tbt_correction == pytest.approx(1.5)  # halfway to 2x
    ledger.add(_inflight("stuck", "d0", 0.0, predicted_tbt_s=0.01))
    ledger.finish("stuck", completion_tokens=100, mean_tbt_s=10.0)
    assert ledger.tbt_correction == pytest.approx(0.5 * 1.5 + 0.5 * 2.0)  # one outlier is clamped at 2x


def test_the_correction_compares_gaps_with_the_batches_the_request_ran_in_not_the_one_at_placement():
    # Placed alone (predicted 0.01 s), then a burst filled the batch: heartbeats put the steps at 0.04 s, and the
    # request saw 0.04 s gaps. The planner was right about the machine: nothing to correct. (Before, the ratio
    # to the placement's 0.01 s taught "4x slower", and the forecast's own batch growth came on top of it.)
    ledger = Ledger(ema_weight=0.5)
    ledger.add(_inflight("head", "d0", start=1.0, predicted_tbt_s=0.01))
    ledger.observe_decode("d0", 0.04, now=0.5)  # before its decode started: not its batch
    ledger.observe_decode("d1", 0.5, now=2.0)  # another instance
    for t in (2.0, 3.0, 4.0):
        ledger.observe_decode("d0", 0.04, now=t)
    assert ledger.finish("head", completion_tokens=100, mean_tbt_s=0.04).planned_tbt_s == pytest.approx(0.04)
    assert ledger.tbt_correction == pytest.approx(1.0)


@pytest.mark.parametrize("mode", ["load", "predicted"])
def test_both_decode_checks_use_the_learnt_correction_and_the_tail_ratio(mode):
    # Step = 0.01 + 1e-3 * 41 + 1e-5 * (40_000 + 17) = 0.451 s for the fit.
    decode = [inst("d0", Role.DECODE, running=40, running_context_tokens=40_000)]
    slo = Slo(ttft_s=10.0, tbt_s=0.5, max_queue_per_instance=8)

    def check(ledger: Ledger, cost=COST):
        v = view([inst("p0", Role.PREFILL)], decode, ledger=ledger)
        v.cost = cost
        return check_admission(mode, v, cache_aware(v, request(1)), request(1), slo)

    assert check(Ledger()) is None
    slower = Ledger()
    slower.tbt_correction = 1.2  # 0.54 s on the real machine
    assert check(slower).reason == "tbt_slo"
    assert check(Ledger(), dataclasses.replace(COST, decode_tail_ratio=1.2)).reason == "tbt_slo"


@pytest.mark.parametrize("mode", ["load", "predicted"])
def test_an_idle_decode_instance_is_never_refused_on_tbt_and_a_busy_one_says_when_to_come_back(mode):
    slo = Slo(ttft_s=10.0, tbt_s=0.005, max_queue_per_instance=8)  # below even a lone step (0.01 s)
    ledger = Ledger()
    ledger.tbt_correction = 2.0

    def check(decode):
        v = view([inst("p0", Role.PREFILL)], [decode], ledger=ledger)
        return check_admission(mode, v, cache_aware(v, request(1, max_tokens=1000)), request(1, max_tokens=1000), slo)

    assert check(inst("d0", Role.DECODE)) is None  # alone it runs as fast as the machine can: refusing helps no one
    busy = check(inst("d0", Role.DECODE, running=4, running_context_tokens=400))
    assert busy.reason == "tbt_slo"
    # about one finish away: a request's 256 expected steps of (0.01 + 5e-3 + 4.17e-3) * 2 s, over 5 requests
    assert busy.retry_after_s == pytest.approx((0.015 + 1e-5 * 417) * 2 * 256 / 5, rel=0.05)
    full = check(inst("d0", Role.DECODE, total_kv_blocks=4, free_kv_blocks=0))
    assert full is not None and full.reason == "tbt_slo"  # idle but no room for its KV


def test_a_tail_ratio_below_one_is_refused():
    with pytest.raises(ValueError, match="decode_tail_ratio must be >= 1"):
        dataclasses.replace(COST, decode_tail_ratio=0.9)


def test_the_ttft_check_learns_how_far_measured_ttfts_run_past_the_prediction():
    ledger = Ledger()
    ledger.add(InFlight("cold", "p0", "d0", 100, 100, 10, placed_at=0.0, decode_start=2.0))
    ledger.finish("cold", completion_tokens=10, ttft_s=20.0, now=7.0)
    # one slow first request (10x) is 1 of the 16 samples it takes to trust the measurements: 10/16 + 15/16
    assert ledger.ttft_correction == pytest.approx(1.5625)
    for i, ttft in enumerate([2.0] * 14 + [6.0, 6.0]):  # predicted 2 s each; two ran 3x longer
        ledger.add(InFlight(f"r{i}", "p0", "d0", 100, 100, 10, placed_at=0.0, decode_start=2.0))
        ledger.finish(f"r{i}", completion_tokens=10, ttft_s=ttft, now=7.0)
    assert ledger.ttft_correction == pytest.approx(60 / 34)  # measured over predicted, in sum, over 17 requests
    ledger.add(InFlight("r", "p0", "d0", 100, 100, 10, placed_at=0.0, decode_start=0.01))  # too short to say
    ledger.finish("r", completion_tokens=10, ttft_s=0.5, now=7.0)
    assert ledger.ttft_correction == pytest.approx(60 / 34)
    ledger.ttft_correction = 2.0
    slo = Slo(ttft_s=1.5, tbt_s=10.0, max_queue_per_instance=8)
    queued = view([inst("p0", Role.PREFILL, waiting=1, queued_prefill_tokens=500)], [inst("d0", Role.DECODE)],
                  ledger=ledger)
    placement = cache_aware(queued, request(1))  # (0.5 s queue + 0.017 s prefill) x 2 = 1.03 s: within 1.5 s
    assert check_admission("predicted", queued, placement, request(1), slo) is None
    ledger.ttft_correction = 4.0  # 2.07 s: over
    refusal = check_admission("predicted", queued, placement, request(1), slo)
    assert refusal.reason == "ttft_slo" and refusal.retry_after_s == 1.0
    idle = view([inst("p0", Role.PREFILL)], [inst("d0", Role.DECODE)], ledger=ledger)
    assert check_admission("load", idle, cache_aware(idle, request(900)), request(900), slo) is None  # 14 s, but it starts now
