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


def test_forecast_adds_admitted_requests_that_land_before_the_arrival():
    ledger = Ledger()
    ledger.add(_entry("in_report", placed=0.0, start=0.5, output=1000))  # in the report at t=1, runs to 10.5
    ledger.add(_entry("soon", placed=1.0, start=1.5))
    ledger.add(_entry("later", placed=1.0, start=9.0))  # lands after the arrival at t=2
    ledger.add(_entry("other", placed=1.0, start=1.5, decode="d1"))
    assert ledger.predict_decode_change("d0", reported_at=1.0, now=1.2, at=2.0) == (1, 1000, 1100)


def test_shared_prompt_blocks_are_counted_once_on_a_decode_instance():
    # 1000-token prompts of 10 blocks of 100 tokens; the first 8 blocks (a shared system prompt) are the same.
    def entry(rid, start, tail, decode="d0", output=100):
        e = _entry(rid, placed=0.0, start=start, decode=decode, output=output)
        e.block_hashes = (*range(8), *tail)
        return e

    ledger = Ledger()
    ledger.add(entry("in_report", 0.5, (100, 101), output=10_000))  # running there: its blocks are in the report
    ledger.add(entry("a", 1.5, (200, 201)))
    ledger.add(entry("b", 1.6, (300, 301)))
    ledger.add(entry("elsewhere", 1.5, (400, 401), decode="d1"))  # another instance's cache shares nothing
    new = (*range(8), 500, 501)
    # a and b add their own 2 blocks and outputs (300 each); the new request's 8 shared blocks come off.
    assert ledger.predict_decode_change("d0", reported_at=1.0, now=1.2, at=2.0, hashes=new, block_size=100) == (
        2, 2000, 2 * 300 - 800)
    # Without block hashes (or a block size) everything counts in full.
    assert ledger.predict_decode_change("d0", reported_at=1.0, now=1.2, at=2.0) == (2, 2000, 2200)
    # Once the running request is all but done, its blocks are not counted as held: a then holds the prefix.
    assert ledger.predict_decode_change("d0", reported_at=1.0, now=1.2, at=200.0, hashes=new,
                                        block_size=100)[2] == -11_000 + 1100 + 300 - 800


def test_finishes_since_the_report_free_their_kv_at_once():
    ledger = Ledger()
    ledger.add(_entry("a", placed=0.0, start=0.5))
    ledger.add(_entry("b", placed=0.0, start=0.5))
    ledger.finish("a", completion_tokens=40, now=0.8)  # before the report at t=1: the report already lacks it
    ledger.finish("b", completion_tokens=60, now=1.1)  # after: the report still holds prompt + 60 tokens
    assert ledger.predict_decode_change("d0", reported_at=1.0, now=1.2, at=1.3) == (-1, -1060, -1060)
    ledger.add(_entry("c", placed=2.0, start=2.5))
    ledger.finish("c", completion_tokens=10)  # no time given: stamped with the latest time seen (placed 2.0)
    assert ledger.predict_decode_change("d0", reported_at=1.5, now=3.0, at=3.0)[2] == -1010


def test_a_reported_request_is_released_only_when_all_but_sure_to_be_done():
    ledger = Ledger(release_confidence=0.95)
    ledger.add(_entry("a", placed=0.0, start=0.0))  # 10 ms per token
    # No finished outputs yet: released once the arrival is past its expected 100 tokens.
    assert ledger.predict_decode_change("d0", reported_at=0.5, now=0.5, at=0.9)[2] == 0
    assert ledger.predict_decode_change("d0", reported_at=0.5, now=0.5, at=1.1)[2] == -1100
    for i in range(100):  # outputs 1..100: 50 tokens in, P(done by 99 | > 50) = 49/50 >= 0.95
        ledger.finish(f"x{i}", completion_tokens=i + 1)
    assert ledger.finish_probability(50, 99, expected=100) == pytest.approx(49 / 50)
    assert ledger.predict_decode_change("d0", reported_at=0.5, now=0.5, at=0.99)[2] == -1100
    assert ledger.predict_decode_change("d0", reported_at=0.5, now=0.5, at=0.9)[2] == 0  # 40/50 < 0.95
    # Running longer than every recent output: nothing says it ends soon.
    assert ledger.finish_probability(150, 10_000, expected=100) == 0.0


def test_requests_waiting_for_kv_count_at_the_mean_reported_size():
    ledger = Ledger()
    ledger.add(_entry("a", placed=0.0, start=0.0, output=100))
    ledger.add(_entry("b", placed=0.0, start=0.0, output=300))
    assert ledger.predict_decode_change("d0", reported_at=0.5, now=0.5, at=0.6, waiting=1)[2] == 1200


def test_output_sample_is_bounded_and_confidence_validated():
    ledger = Ledger(output_sample_size=3)
    for n in (5, 1, 9, 7):
        ledger.finish("gone", completion_tokens=n)
    assert ledger.finish_probability(0, 6, expected=1) == pytest.approx(1 / 3)  # sample {1, 9, 7}
    with pytest.raises(ValueError, match="release_confidence"):
        Ledger(release_confidence=0.0)


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


def test_a_prefill_the_plan_says_is_done_leaves_the_queued_tokens_until_the_next_heartbeat():
    ledger = Ledger()
    ledger.add(_entry("short", placed=3.0, start=3.2))  # predicted TTFT 0.2 s
    ledger.add(_entry("long", placed=3.0, start=9.0))
    assert ledger.reserved("p0", since=2.0, now=4.0) == (2, 900, 0)  # "short" left prefill at 3.2 (tokens)
    assert ledger.reserved("d0", since=2.0, now=4.0) == (2, 0, 2000)  # both are on decode (or about to be)
    ledger.ttft_correction = 10.0  # TTFTs have run 10x the plan: "short" is taken to be prefilling until 5.0
    assert ledger.reserved("p0", since=2.0, now=4.0) == (2, 1800, 0)


def test_pending_prefix_is_the_longest_prefix_a_request_queued_on_that_instance_computes():
    ledger = Ledger()
    ledger.add(InFlight("a", "p0", "d0", 100, 100, 10, placed_at=0.0, decode_start=1.0, block_hashes=(1, 2, 3, 4)))
    ledger.add(InFlight("b", "p1", "d0", 100, 100, 10, placed_at=0.0, decode_start=1.0, block_hashes=(1, 2, 3, 4, 5)))
    assert ledger.pending_prefix("p0", (1, 2, 3, 9)) == 3
    assert ledger.pending_prefix("p0", (1, 2, 3, 4, 5, 6)) == 4
    assert ledger.pending_prefix("p1", (1, 2, 3, 4, 5, 6)) == 5
    assert ledger.pending_prefix("p0", (7, 2, 3)) == 0 and ledger.pending_prefix("p0", ()) == 0
    ledger.finish("a")
    assert ledger.pending_prefix("p0", (1, 2, 3)) == 0
