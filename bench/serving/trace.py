"""Request traces for the simulator and the live replay: the Mooncake FAST'25 format, slicing, synthetic traces.

Format (one JSON object per line): ``timestamp`` (ms since trace start), ``input_length`` and ``output_length``
(tokens), ``hash_ids`` (prefix-block ids over 512-token blocks; equal lists up to block i = shared KV up to i).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

TRACE_BLOCK_TOKENS = 512
DEFAULT_TRACE = Path(__file__).resolve().parents[2].parent / "shared" / "traces" / "conversation_trace.jsonl"


@dataclass(frozen=True)
class TraceRequest:
    arrival_s: float
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]

    def full_block_hashes(self, block_tokens: int = TRACE_BLOCK_TOKENS) -> tuple[int, ...]:
        """Ids of the *full* blocks only: a trailing partial block's id names a different, partial KV block."""
        return self.hash_ids[: self.input_length // block_tokens]


def parse_line(line: str, lineno: int = 0) -> TraceRequest:
    try:
        d = json.loads(line)
        req = TraceRequest(d["timestamp"] / 1000.0, int(d["input_length"]), int(d["output_length"]),
                           tuple(int(h) for h in d["hash_ids"]))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"trace line {lineno}: not a trace record ({e}): {line[:80]!r}") from e
    if req.input_length <= 0 or req.output_length <= 0:
        raise ValueError(f"trace line {lineno}: input_length and output_length must be positive")
    return req


def load_trace(path: str | Path = DEFAULT_TRACE, start_s: float = 0.0, duration_s: float | None = None,
               speedup: float = 1.0, limit: int | None = None) -> list[TraceRequest]:
    """Requests arriving in [start_s, start_s + duration_s) of the trace, re-timed from 0 and compressed by
    ``speedup`` (2.0 = twice the request rate)."""
    if speedup <= 0:
        raise ValueError("speedup must be positive")
    out: list[TraceRequest] = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            req = parse_line(line, lineno)
            if req.arrival_s < start_s:
                continue
            if duration_s is not None and req.arrival_s >= start_s + duration_s:
                break
            out.append(TraceRequest((req.arrival_s - start_s) / speedup, req.input_length, req.output_length,
                                    req.hash_ids))
            if limit is not None and len(out) >= limit:
                break
    return out


def synthetic_trace(n: int, rate_per_s: float, seed: int = 0, prefixes: int = 4, prefix_blocks: int = 4,
                    unique_blocks: tuple[int, int] = (1, 4), output: tuple[int, int] = (8, 64),
                    ) -> list[TraceRequest]:
    """Poisson arrivals; each request = one of ``prefixes`` shared prefixes + its own blocks (a small chat load)."""
    rng = random.Random(seed)
    t, next_id, out = 0.0, prefixes * prefix_blocks, []
    for _ in range(n):
        t += rng.expovariate(rate_per_s)
        p = rng.randrange(prefixes)
        own = rng.randint(*unique_blocks)
        hashes = tuple(range(p * prefix_blocks, (p + 1) * prefix_blocks)) + tuple(range(next_id, next_id + own))
        next_id += own
        tokens = len(hashes) * TRACE_BLOCK_TOKENS - rng.randrange(TRACE_BLOCK_TOKENS)
        out.append(TraceRequest(t, tokens, rng.randint(*output), hashes))
    return out
