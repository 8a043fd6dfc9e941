"""The mooncake policy's decode pick: the lowest predicted TBT, except under sustained overload (triage).
Budget here: Slo().tbt_s = 0.1 s per step (decode_tail_ratio 1, no correction learnt); a step costs
0.01 + 1e-3 * batch + 1e-5 * context tokens (helpers.COST)."""

from __future__ import annotations

import dataclasses

from crescent.services.conductor.cluster import Role, Slo
from crescent.services.conductor.ledger import Ledger
from crescent.services.conductor.policies import least_loaded, mooncake, tbt_budget

from .helpers import COST, inst, request, view


def _decode(**loads) -> list:
    return [inst(iid, Role.DECODE, **load) for iid, load in loads.items()]


def _p0() -> list:
    return [inst("p0", Role.PREFILL)]


def test_sustained_overload_goes_to_the_instance_furthest_past_the_budget():
    # Both reports put a step past 0.1 s: d0 at ~0.65 s, d1 at ~0.23 s. The request meets its SLO nowhere; on d1
    # it would only push d1's requests further out, so it goes to d0 (least_loaded, blind to SLOs, takes d1).
    d = _decode(d0=dict(running=40, running_context_tokens=60_000), d1=dict(running=20, running_context_tokens=20_000))
    v = view(_p0(), d)
    assert tbt_budget(v) == 0.1
    placed = mooncake(v, request(2))
    assert placed.decode.instance_id == "d0"
    assert placed.predicted_tbt_s == COST.decode_step_time(41, 60_033)
    assert least_loaded(v, request(2)).decode.instance_id == "d1"


def test_an_instance_within_the_budget_is_always_preferred():
    d = _decode(d0=dict(running=40, running_context_tokens=60_000), d1=dict(running=2, running_context_tokens=500))
    assert mooncake(view(_p0(), d), request(2)).decode.instance_id == "d1"


def test_a_looser_slo_turns_triage_back_into_balancing():
    d = _decode(d0=dict(running=40, running_context_tokens=60_000), d1=dict(running=20, running_context_tokens=20_000))
    v = view(_p0(), d)
    v.slo = Slo(tbt_s=0.5)  # d1 (~0.23 s) now keeps the SLO
    assert mooncake(v, request(2)).decode.instance_id == "d1"


def test_the_budget_follows_the_tail_ratio_and_the_learnt_correction():
    ledger = Ledger()
    ledger.tbt_correction = 2.0  # the machines run twice as slow as the planner's fit
    v = view(_p0(), _decode(d0={}), ledger=ledger)
    v.cost = dataclasses.replace(COST, decode_tail_ratio=1.25)
    assert tbt_budget(v) == 0.1 / 1.25 / 2.0


def test_placements_the_reports_have_not_confirmed_are_no_overload():
    # Idle reports; requests placed since (reservations) put both instances past the budget. That may be a burst
    # the instances ride out: balance (d1, lighter), do not pile onto d0.
    d = _decode(d0={}, d1={})
    d[0].reserved_requests, d[0].reserved_context_tokens = 1, 20_000
    d[1].reserved_requests, d[1].reserved_context_tokens = 1, 10_000
    assert mooncake(view(_p0(), d), request(2)).decode.instance_id == "d1"
