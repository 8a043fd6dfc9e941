"""Requests the conductor admitted and has not seen finish: reserved load, and predicted future decode load.

Two uses. (1) Reservations: work placed on an instance after its last heartbeat is not in the load it reported
yet, so it is added on top; bursts then spread before heartbeats catch up, and nothing is counted twice. (2) The
``predicted`` early rejection: the decode batch at the moment a new request would reach decode is the set of
admitted requests whose decode window [start, end) covers that moment (Mooncake §6: a uniform decode time per
request). start = placement + predicted TTFT; the window's length = expected output (the running mean of finished
requests' lengths) x the time per token (the larger of the step time predicted at placement and the one learnt from
finished requests: a saturated decode instance is slower than any estimate made at placement). A request past its
window that has not finished is known to be still running: it is kept for ``overdue_window_fraction`` of a window.
(Measured alternatives that did worse in the simulator: anchoring the forecast on the reported load plus the
ledger's predicted change, and an empirical output-length distribution instead of the mean.)
"""

from __future__ import annotations

import threading
from dataclasses import dataclass


@dataclass
class InFlight:
    request_id: str
    prefill_id: str
    decode_id: str
    prompt_tokens: int
    new_prefill_tokens: int
    expected_output: int
    placed_at: float
    decode_start: float  # estimated: placed_at + predicted TTFT
    predicted_tbt_s: float = 0.0  # the decode step time predicted at placement (a floor for the window)


class Ledger:
    def __init__(self, default_output_tokens: int = 256, ema_weight: float = 0.05,
                 overdue_window_fraction: float = 0.5) -> None:
        self._inflight: dict[str, InFlight] = {}
        self._lock = threading.Lock()
        self.mean_output_tokens = float(default_output_tokens)
        self.mean_tbt_s = 0.0  # seconds per output token in decode, learnt from finished requests
        self.ema_weight = ema_weight
        self.overdue_window_fraction = overdue_window_fraction

    def expected_output(self, max_tokens: int) -> int:
        """Output length to plan for: the running mean of finished requests, capped by the request's limit."""
        mean = max(1, round(self.mean_output_tokens))
        return min(max_tokens, mean) if max_tokens > 0 else mean

    def add(self, entry: InFlight) -> None:
        with self._lock:
            self._inflight[entry.request_id] = entry

    def finish(self, request_id: str, completion_tokens: int | None = None, mean_tbt_s: float | None = None,
               ) -> InFlight | None:
        """Forget a request; learn from its output length and its mean time per output token when given."""
        with self._lock:
            entry = self._inflight.pop(request_id, None)
            w = self.ema_weight
            if completion_tokens is not None and completion_tokens > 0:
                self.mean_output_tokens = (1 - w) * self.mean_output_tokens + w * completion_tokens
            if mean_tbt_s is not None and mean_tbt_s > 0:
                self.mean_tbt_s = mean_tbt_s if self.mean_tbt_s == 0 else (1 - w) * self.mean_tbt_s + w * mean_tbt_s
            return entry

    def prune(self, placed_before: float) -> int:
        """Forget requests placed before ``placed_before`` whose Finish never came (a crashed gateway)."""
        with self._lock:
            stale = [rid for rid, e in self._inflight.items() if e.placed_at < placed_before]
            for rid in stale:
                del self._inflight[rid]
        return len(stale)

    def __len__(self) -> int:
        return len(self._inflight)

    def reserved(self, instance_id: str, since: float) -> tuple[int, int, int]:
        """(requests, prefill tokens, context tokens) placed on ``instance_id`` after time ``since``."""
        requests = prefill_tokens = context = 0
        with self._lock:
            for e in self._inflight.values():
                if e.placed_at < since:  # the heartbeat at `since` already counted it
                    continue
                if e.prefill_id == instance_id:
                    requests += 1
                    prefill_tokens += e.new_prefill_tokens
                if e.decode_id == instance_id:
                    requests += 1
                    context += e.prompt_tokens
        return requests, prefill_tokens, context

    def predict_decode(self, decode_id: str, at: float, now: float | None = None) -> tuple[int, int, int]:
        """(batch, context tokens, reserved KV tokens) on ``decode_id`` at time ``at`` (>= ``now``).

        Reserved = prompt + expected output of each request (what a worst-case KV planner holds for it).
        """
        now = at if now is None else now
        batch = context = reserved = 0
        with self._lock:
            for e in self._inflight.values():
                if e.decode_id != decode_id or e.decode_start > at:
                    continue
                span = e.expected_output * max(e.predicted_tbt_s, self.mean_tbt_s, 1e-6)
                end = e.decode_start + span
                if end <= now:  # overdue but unfinished: still running
                    end = now + span * self.overdue_window_fraction
                if at >= end:
                    continue
                batch += 1
                done = min(1.0, (at - e.decode_start) / span)
                context += e.prompt_tokens + int(e.expected_output * done)
                reserved += e.prompt_tokens + e.expected_output
        return batch, context, reserved
