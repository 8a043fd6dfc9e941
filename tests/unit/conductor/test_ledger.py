from __future__ import annotations

import pytest

from crescent.services.conductor.ledger import InFlight, Ledger


def _entry(rid: str, placed: float, start: float, decode: str = "d0", output: int = 100) -> InFlight:
    return InFlight(rid, "p0", decode, prompt_tokens=1000, new_prefill_tokens=900, expected_output=output,
                    placed_at=placed, decode_start=start, predicted_tbt_s=0.01)


def test_reservations_count_only_work_placed_after_the_heartbeat():
    ledger = Ledger()
    ledger.add(_entry("old", placed=1.0, start=2.0))
    ledger.add(_entry("new", placed=3.0, start=4.0))
    assert ledger.reserved("p0", since=2.0) == (1, 900, 0)
    assert ledger.reserved("d0", since=2.0) == (1, 0, 1000)
    assert ledger.reserved("p0", since=0.0) == (2, 1800, 0)


def test_decode_windows_use_the_learnt_time_per_token():
    ledger = Ledger()
    ledger.add(_entry("a", placed=0.0, start=1.0))  # window 100 tokens x 10 ms = [1, 2)
    assert ledger.predict_decode("d0", at=1.5, now=0.0) == (1, 1050, 1100)
    assert ledger.predict_decode("d0", at=2.5, now=0.0)[0] == 0
    assert ledger.predict_decode("d1", at=1.5, now=0.0)[0] == 0
    ledger.finish("other", completion_tokens=100, mean_tbt_s=0.05)  # decode runs 5x slower than planned
    assert ledger.predict_decode("d0", at=2.5, now=0.0)[0] == 1  # window now [1, 6)


def test_an_overdue_unfinished_request_still_counts():
    ledger = Ledger(overdue_window_fraction=0.5)
    ledger.add(_entry("a", placed=0.0, start=1.0))  # expected end 2.0; at now=3 it has not finished
    assert ledger.predict_decode("d0", at=3.2, now=3.0)[0] == 1  # kept until now + 0.5 window = 3.5
    assert ledger.predict_decode("d0", at=3.6, now=3.0)[0] == 0


def test_expected_output_learns_from_finishes():
    ledger = Ledger(default_output_tokens=100, ema_weight=0.5)
    ledger.add(_entry("a", 0.0, 0.0))
    assert ledger.finish("a", completion_tokens=300) is not None
    assert ledger.mean_output_tokens == pytest.approx(200)
    assert ledger.expected_output(max_tokens=150) == 150 and ledger.expected_output(max_tokens=0) == 200
    assert ledger.finish("a") is None and len(ledger) == 0


def test_prune_forgets_requests_whose_finish_never_came():
    ledger = Ledger()
    ledger.add(_entry("lost", placed=0.0, start=1.0))
    ledger.add(_entry("live", placed=100.0, start=101.0))
    assert ledger.prune(placed_before=50.0) == 1 and len(ledger) == 1
