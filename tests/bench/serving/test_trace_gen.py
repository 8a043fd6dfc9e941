"""The trace suite's generators: the shapes they promise (reuse, sessions, bursts, oscillation), seeded."""

from __future__ import annotations

import pytest

from bench.serving import trace_gen
from bench.serving.sim_metrics import ideal_hit_rate
from bench.serving.trace import TraceRequest


def _rate(trace: list[TraceRequest], keep) -> float:
    """Requests per second of trace time where ``keep(t)`` holds (time measured on a 0.1 s grid)."""
    end = trace[-1].arrival_s
    grid = [i * 0.1 for i in range(int(end / 0.1))]
    covered = sum(0.1 for t in grid if keep(t))
    return sum(1 for r in trace if keep(r.arrival_s)) / covered


@pytest.mark.parametrize("make", [
    lambda: trace_gen.long_context_documents(300, 5.0, seed=1),
    lambda: trace_gen.agent_sessions(300, 20.0, seed=2),
    lambda: trace_gen.bursty_chat(300, 20.0, seed=3),
    lambda: trace_gen.oscillating_decode(300, 10.0, seed=4),
], ids=["long_documents", "agent_sessions", "bursty_chat", "oscillating_decode"])
def test_every_generator_is_a_valid_seeded_trace(make):
    trace = make()
    assert len(trace) == 300 and trace == make()
    assert all(a.arrival_s <= b.arrival_s for a, b in zip(trace, trace[1:], strict=False))
    for r in trace:
        assert r.input_length > 0 and r.output_length > 0
        assert len(r.hash_ids) == -(-r.input_length // trace_gen.BLOCK)  # the last block is partial


def test_long_documents_are_long_and_mostly_shared():
    trace = trace_gen.long_context_documents(300, 5.0, seed=1)
    assert min(r.input_length for r in trace) > 8000
    assert ideal_hit_rate(trace) > 0.8


def test_an_agent_turn_extends_an_earlier_turn_of_its_session():
    trace = trace_gen.agent_sessions(300, 20.0, seed=2)
    extended = sum(any(len(o.hash_ids) < len(r.hash_ids) and r.hash_ids[:len(o.hash_ids) - 1] == o.hash_ids[:-1]
                       for o in trace if o.arrival_s < r.arrival_s) for r in trace)
    assert extended > 0.6 * len(trace)  # every turn after a session's first


def test_bursts_and_oscillation_move_the_arrival_rate():
    bursty = trace_gen.bursty_chat(2000, 20.0, seed=3, burst_factor=4.0, period_s=30.0, burst_fraction=0.25)
    in_burst = _rate(bursty, lambda t: t % 30.0 < 7.5)
    quiet = _rate(bursty, lambda t: t % 30.0 >= 7.5)
    assert 3.0 < in_burst / quiet < 5.0
    osc = trace_gen.oscillating_decode(2000, 10.0, seed=4, swing=0.8, period_s=40.0)
    high = _rate(osc, lambda t: t % 40.0 < 20.0)
    low = _rate(osc, lambda t: t % 40.0 >= 20.0)
    assert high > 3 * low


def test_scaling_keeps_every_block_id_on_one_block():
    trace = trace_gen.long_context_documents(50, 5.0, seed=1)
    small = trace_gen.scale_tokens(trace, 32, 8)
    for big, r in zip(trace, small, strict=True):
        assert r.full_block_hashes(16) == big.full_block_hashes(512)
        assert r.output_length == max(1, round(big.output_length / 8))
    fast = trace_gen.speed_up(trace, 2.0)
    assert fast[-1].arrival_s == pytest.approx(trace[-1].arrival_s / 2)
    with pytest.raises(ValueError, match="must divide 512"):
        trace_gen.scale_tokens(trace, 7, 1)
    with pytest.raises(ValueError, match="positive"):
        trace_gen.speed_up(trace, 0)
