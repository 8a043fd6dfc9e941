from __future__ import annotations

import pytest

from crescent.services.conductor.cluster import Role, Slo
from crescent.services.conductor.ledger import InFlight, Ledger
from crescent.services.conductor.policies import least_loaded
from crescent.services.conductor.rejection import check_admission

from .helpers import inst, request, view

SLO = Slo(ttft_s=1.0, tbt_s=0.1, max_queue_per_instance=4)


def _busy_decode(running: int, context: int):
    return [inst("d0", Role.DECODE, running=running, running_context_tokens=context)]


def _check(mode, v, req):
    return check_admission(mode, v, least_loaded(v, req), req, SLO)


def _inflight(rid: str, start: float, end: float) -> InFlight:
    return InFlight(rid, "p0", "d0", prompt_tokens=1000, new_prefill_tokens=1000, expected_output=100,
                    placed_at=0.0, decode_start=start, predicted_tbt_s=(end - start) / 100)


@pytest.mark.parametrize("mode", ["none", "load", "predicted"])
def test_the_queue_cap_always_applies(mode):
    v = view([inst("p0", Role.PREFILL, waiting=4, queued_prefill_tokens=100)], _busy_decode(0, 0))
    refusal = _check(mode, v, request(1))
    assert refusal.reason == "queue_full" and refusal.retry_after_s >= 1.0


def test_none_admits_what_breaks_the_slos():
    v = view([inst("p0", Role.PREFILL, waiting=1, queued_prefill_tokens=5000)], _busy_decode(200, 10_000))
    assert _check("none", v, request(1)) is None
    assert _check("load", v, request(1)).reason == "ttft_slo"


def test_load_rejects_on_the_current_decode_load():
    # 0.01 + 1e-3 * 81 + 1e-5 * (1000 + 17) > 0.1
    v = view([inst("p0", Role.PREFILL)], _busy_decode(80, 1000))
    assert _check("load", v, request(1)).reason == "tbt_slo"
    assert _check("load", view([inst("p0", Role.PREFILL)], _busy_decode(10, 1000)), request(1)) is None


def test_predicted_admits_when_the_running_batch_will_be_gone_by_arrival():
    ledger = Ledger()
    for i in range(80):  # the 80 reported running requests all end before this one leaves prefill (t = 0.017 s)
        ledger.add(_inflight(f"old{i}", start=-10.0, end=0.01))
    v = view([inst("p0", Role.PREFILL)], _busy_decode(80, 80 * 1000), ledger=ledger)
    assert _check("load", v, request(1)).reason == "tbt_slo"
    assert _check("predicted", v, request(1)) is None


def test_predicted_rejects_when_admitted_prefills_are_about_to_land():
    ledger = Ledger()
    for i in range(80):  # admitted, still in prefill now, decoding when this one arrives
        ledger.add(_inflight(f"new{i}", start=0.005, end=5.0))
    v = view([inst("p0", Role.PREFILL)], _busy_decode(0, 0), ledger=ledger)
    assert _check("load", v, request(1)) is None
    assert _check("predicted", v, request(1)).reason == "tbt_slo"


def test_unknown_mode():
    v = view([inst("p0", Role.PREFILL)], _busy_decode(0, 0))
    with pytest.raises(ValueError, match="unknown rejection mode 'maybe'"):
        _check("maybe", v, request(1))


def test_no_free_kv_on_decode_is_a_tbt_rejection():
    # 2 free blocks of 16 tokens cannot hold a 17-token prompt plus the expected 32 output tokens.
    decode = [inst("d0", Role.DECODE, free_kv_blocks=2, total_kv_blocks=100)]
    v = view([inst("p0", Role.PREFILL)], decode)
    assert _check("load", v, request(1)).reason == "tbt_slo"
    ledger = Ledger()
    for i in range(3):  # predicted: 3 x (1000 + 100) landing after the report + this one > 100 blocks x 16
        ledger.add(_inflight(f"x{i}", start=0.001, end=5.0))
    v = view([inst("p0", Role.PREFILL)], [inst("d0", Role.DECODE, free_kv_blocks=100, total_kv_blocks=100)],
             ledger=ledger)
    assert _check("load", v, request(1)) is None
    assert _check("predicted", v, request(1)).reason == "tbt_slo"


def test_predicted_subtracts_finishes_the_heartbeat_still_counts():
    # The report (t=0) says 90 of 100 blocks used; a 1000-token request finished since: room for this one.
    ledger = Ledger()
    ledger.add(_inflight("done", start=-5.0, end=5.0))
    ledger.finish("done", completion_tokens=100, now=0.0)
    decode = [inst("d0", Role.DECODE, running=1, free_kv_blocks=2, total_kv_blocks=100)]
    v = view([inst("p0", Role.PREFILL)], decode, ledger=ledger)
    assert _check("load", v, request(1)).reason == "tbt_slo"
    assert _check("predicted", v, request(1)) is None


def test_predicted_counts_requests_waiting_for_decode_kv():
    ledger = Ledger()
    ledger.add(_inflight("stuck", start=-1.0, end=50.0))  # reported waiting: not in the used KV yet
    decode = [inst("d0", Role.DECODE, waiting=1, free_kv_blocks=60, total_kv_blocks=100)]
    v = view([inst("p0", Role.PREFILL)], decode, ledger=ledger)
    assert _check("predicted", v, request(1)).reason == "tbt_slo"  # 40 x 16 + 1100 + 17 + 32 > 1600
