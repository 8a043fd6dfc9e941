"""Synthetic traces with the shapes Mooncake's paper and traces describe, in the FAST'25 format (trace.py).

Every generator is seeded and returns ``TraceRequest``s whose ``hash_ids`` are 512-token prefix blocks, like the
conversation trace: equal ids up to block i = shared KV up to block i. ``scale_tokens`` then shrinks a trace to
the sizes a small measured machine serves (bench/serving/trace_suite.py).

- ``long_context_documents``: few long documents (tens of blocks) asked many questions each, Zipf-popular
  (Mooncake's long-context / document QA load: most of each prompt is a shared prefix).
- ``agent_sessions``: tool/agent sessions; each turn resends the whole history plus the tool's result, so a
  session's prompts are prefixes of each other, and sessions of one agent share its system prompt and tools.
- ``bursty_chat``: short chat requests whose rate switches between a quiet and a burst level (on/off arrivals).
- ``oscillating_decode``: a rate that swings sinusoidally with long outputs, so decode load rises and falls with
  a lag behind prefill: the case where forecasting decode load at arrival differs from reading it now.
"""

from __future__ import annotations

import math
import random
from dataclasses import replace

from bench.serving.trace import TRACE_BLOCK_TOKENS, TraceRequest

BLOCK = TRACE_BLOCK_TOKENS


class _Ids:
    """Fresh, never-reused block ids."""

    def __init__(self, start: int = 0) -> None:
        self.next = start

    def take(self, n: int) -> tuple[int, ...]:
        out = tuple(range(self.next, self.next + n))
        self.next += n
        return out


def _request(t: float, hashes: tuple[int, ...], output: int, rng: random.Random) -> TraceRequest:
    # The last block is partial, as in the FAST'25 trace: its id is unique to the request.
    tokens = len(hashes) * BLOCK - rng.randrange(1, BLOCK)
    return TraceRequest(t, max(tokens, 1), max(output, 1), hashes)


def _zipf_pick(rng: random.Random, n: int, s: float) -> int:
    weights = [1.0 / (k + 1) ** s for k in range(n)]
    return rng.choices(range(n), weights=weights)[0]


def long_context_documents(n: int, rate_per_s: float, seed: int = 0, documents: int = 24,
                           doc_blocks: tuple[int, int] = (16, 64), question_blocks: tuple[int, int] = (1, 2),
                           output: tuple[int, int] = (64, 384), zipf_s: float = 1.1) -> list[TraceRequest]:
    """Poisson arrivals; each request = one document (8K-32K tokens) + its own question."""
    rng, ids = random.Random(seed), _Ids()
    docs = [ids.take(rng.randint(*doc_blocks)) for _ in range(documents)]
    t, out = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate_per_s)
        doc = docs[_zipf_pick(rng, documents, zipf_s)]
        out.append(_request(t, doc + ids.take(rng.randint(*question_blocks)), rng.randint(*output), rng))
    return out


def agent_sessions(n: int, rate_per_s: float, seed: int = 0, agents: int = 4, system_blocks: tuple[int, int] = (6, 12),
                   turns: tuple[int, int] = (3, 10), tool_blocks: tuple[int, int] = (1, 4),
                   think_s: tuple[float, float] = (0.2, 2.0), output: tuple[int, int] = (16, 192),
                   ) -> list[TraceRequest]:
    """Sessions start as a Poisson process at ``rate_per_s`` / mean turns (so requests arrive at about
    ``rate_per_s`` once sessions overlap); each turn re-sends the history."""
    rng, ids = random.Random(seed), _Ids()
    systems = [ids.take(rng.randint(*system_blocks)) for _ in range(agents)]
    mean_turns = sum(turns) / 2
    out: list[TraceRequest] = []
    start = 0.0
    # Sessions keep starting until the n-th earliest request's time has passed: cutting at n generated requests
    # instead would keep only the first sessions, spread thin over their think times.
    while len(out) < n or start < sorted(r.arrival_s for r in out)[n - 1]:
        start += rng.expovariate(rate_per_s / mean_turns)
        history, t = systems[rng.randrange(agents)] + ids.take(1), start
        for _ in range(rng.randint(*turns)):
            answer = rng.randint(*output)
            out.append(_request(t, history + ids.take(1), answer, rng))
            # The next turn carries this turn's answer and the tool's result as new full blocks.
            history = history + ids.take(rng.randint(*tool_blocks) + answer // BLOCK)
            t += rng.uniform(*think_s)
    out.sort(key=lambda r: r.arrival_s)
    return out[:n]


def bursty_chat(n: int, rate_per_s: float, seed: int = 0, burst_factor: float = 4.0, period_s: float = 30.0,
                burst_fraction: float = 0.25, prefixes: int = 16, prefix_blocks: tuple[int, int] = (2, 8),
                unique_blocks: tuple[int, int] = (1, 12), output: tuple[int, int] = (32, 512)) -> list[TraceRequest]:
    """On/off arrivals averaging ``rate_per_s``: ``burst_fraction`` of each period at ``burst_factor`` x the rest."""
    rng, ids = random.Random(seed), _Ids()
    shared = [ids.take(rng.randint(*prefix_blocks)) for _ in range(prefixes)]
    quiet = rate_per_s / (burst_fraction * burst_factor + (1 - burst_fraction))
    t, out = 0.0, []
    while len(out) < n:
        burst = (t % period_s) < burst_fraction * period_s
        t += rng.expovariate(quiet * (burst_factor if burst else 1.0))
        hashes = shared[_zipf_pick(rng, prefixes, 1.0)] + ids.take(rng.randint(*unique_blocks))
        out.append(_request(t, hashes, rng.randint(*output), rng))
    return out


def oscillating_decode(n: int, rate_per_s: float, seed: int = 0, swing: float = 0.8, period_s: float = 40.0,
                       prompt_blocks: tuple[int, int] = (2, 10), prefixes: int = 8,
                       output: tuple[int, int] = (256, 1024)) -> list[TraceRequest]:
    """Rate(t) = rate * (1 + swing * sin(2 pi t / period)) (thinned Poisson), long outputs."""
    rng, ids = random.Random(seed), _Ids()
    shared = [ids.take(2) for _ in range(prefixes)]
    peak = rate_per_s * (1 + swing)
    t, out = 0.0, []
    while len(out) < n:
        t += rng.expovariate(peak)
        if rng.random() * peak > rate_per_s * (1 + swing * math.sin(2 * math.pi * t / period_s)):
            continue
        hashes = shared[rng.randrange(prefixes)] + ids.take(rng.randint(*prompt_blocks))
        out.append(_request(t, hashes, rng.randint(*output), rng))
    return out


def speed_up(trace: list[TraceRequest], factor: float) -> list[TraceRequest]:
    """The same requests arriving ``factor`` times faster."""
    if factor <= 0:
        raise ValueError("speed-up factor must be positive")
    return [replace(r, arrival_s=r.arrival_s / factor) for r in trace]


def scale_tokens(trace: list[TraceRequest], input_divisor: int, output_divisor: int) -> list[TraceRequest]:
    """Shrink prompts (a 512-token block becomes 512 / ``input_divisor`` tokens, ids unchanged) and outputs.

    Simulate with ``block_tokens = 512 // input_divisor`` so that every id still names one block.
    """
    if input_divisor <= 0 or output_divisor <= 0 or BLOCK % input_divisor:
        raise ValueError(f"divisors must be positive and input_divisor must divide {BLOCK}")
    # Floor, not ceiling: a prompt 1-31 tokens short of a full block must stay short of it once shrunk.
    return [replace(r, input_length=max(1, r.input_length // input_divisor),
                    output_length=max(1, round(r.output_length / output_divisor))) for r in trace]
