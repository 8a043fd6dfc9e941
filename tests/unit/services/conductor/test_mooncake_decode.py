"""The mooncake policy's decode pick (forecast over the stay, triage under sustained overload) and its prefill
candidates under the queue cap. Budget here: Slo().tbt_s = 0.1 s per step (decode_tail_ratio 1, no correction);
a step costs 0.01 + 1e-3 * batch + 1e-5 * context tokens (helpers.COST)."""

from __future__ import annotations

from crescent.services.conductor.cluster import Role, Slo
from crescent.services.conductor.ledger import InFlight, Ledger
from crescent.services.conductor.policies import least_loaded, mooncake, tbt_budget

from .helpers import inst, request, view


def _admitted(ledger: Ledger, rid: str, decode_id: str, prompt: int, decode_start: float) -> None:
    ledger.add(InFlight(request_id=rid, prefill_id="p9", decode_id=decode_id, prompt_tokens=prompt,
                        new_prefill_tokens=prompt, expected_output=10, placed_at=0.0, decode_start=decode_start))


def _decode(**loads) -> list:
    return [inst(iid, Role.DECODE, **load) for iid, load in loads.items()]


def test_a_request_landing_after_this_one_still_counts():
    # d0 and d1 look alike at this request's arrival (~33 ms), but a 5000-token prompt lands on d0 at 5 s, inside
    # this request's stay. Counting only landers before the arrival would pick d0 (the tie-break).
    ledger = Ledger()
    _admitted(ledger, "x", "d0", 5000, decode_start=5.0)
    placed = mooncake(view([inst("p0", Role.PREFILL)], _decode(d0={}, d1={}), ledger=ledger), request(2))
    assert placed.decode.instance_id == "d1"


def test_sustained_overload_goes_to_the_instance_furthest_past_the_budget():
    # Both reports put a step past 0.1 s: d0 at ~0.65 s, d1 at ~0.23 s. The request meets its SLO nowhere; on d1
    # it would only push d1's requests further out, so it goes to d0 (least_loaded, blind to SLOs, takes d1).
    d = _decode(d0=dict(running=40, running_context_tokens=60_000), d1=dict(running=20, running_context_tokens=20_000))
    v = view([inst("p0", Role.PREFILL)], d)
    assert tbt_budget(v) == 0.1
    assert mooncake(v, request(2)).decode.instance_id == "d0"
    assert least_loaded(v, request(2)).decode.instance_id == "d1"


def test_an_instance_within_the_budget_is_always_preferred():
    d = _decode(d0=dict(running=40, running_context_tokens=60_000), d1=dict(running=2, running_context_tokens=500))
    assert mooncake(view([inst("p0", Role.PREFILL)], d), request(2)).decode.instance_id == "d1"


def test_a_burst_the_forecast_overstates_is_not_triaged():
    # The reports are idle; admitted prompts about to land put both forecasts past the budget (d0 ~0.21 s,
    # d1 ~0.11 s at the arrival). That is load the reports have not confirmed: balance, do not pile on d0.
    ledger = Ledger()
    _admitted(ledger, "a", "d0", 20_000, decode_start=0.01)
    _admitted(ledger, "b", "d1", 10_000, decode_start=0.01)
    placed = mooncake(view([inst("p0", Role.PREFILL)], _decode(d0={}, d1={}), ledger=ledger), request(2))
    assert placed.decode.instance_id == "d1"


def test_a_prefill_instance_at_the_queue_cap_is_passed_over():
    # p0's queue is short in time (4 tokens) but at the cap in count: admission would refuse it as queue_full.
    p = [inst("p0", Role.PREFILL, waiting=4, queued_prefill_tokens=4),
         inst("p1", Role.PREFILL, waiting=1, queued_prefill_tokens=2000)]
    v = view(p, _decode(d0={}))
    assert mooncake(v, request(2)).prefill.instance_id == "p0"  # default cap (64): p0 is 2 s ahead
    v.slo = Slo(max_queue_per_instance=4)
    assert mooncake(v, request(2)).prefill.instance_id == "p1"
    p[1].load.waiting = 4  # every instance at the cap: place anyway, admission answers with queue_full
    assert mooncake(v, request(2)).prefill.instance_id == "p0"
