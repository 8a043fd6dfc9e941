"""Requests the conductor admitted and has not seen finish: reserved load, and the forecast decode load.

Two uses. (1) Reservations: work placed on an instance after its last heartbeat is not in the load it reported
yet, so it is added on top; bursts then spread before heartbeats catch up, and nothing is counted twice. (2) The
``predicted`` early rejection (Mooncake §6): the decode load at the moment a new request would reach decode,
forecast from the decode instance's last report plus what the ledger knows happened or will happen since:
- minus the KV of requests that finished after the report (the report still holds it; forgetting this
  double-counted a finished request against new work, about one heartbeat's worth of releases);
- plus every admitted request estimated to land in decode after the report and before the arrival
  (start = placement + predicted TTFT), and the requests the report shows waiting for KV;
- minus a reported request's KV only when it is all but sure to have finished by the arrival:
  P(output <= tokens by then | output > tokens so far) >= ``release_confidence``, from the recent finished
  requests' output lengths. Crediting expected releases (a mean decode window per request, as this module did
  before) over-admits whenever long outputs run past their window; a decode instance whose KV is over-committed
  queues arrivals FIFO, and one blocked head stalls every request behind it, so at 2.5-3x load the mean-window
  forecast both rejected more and missed more SLOs than the ``load`` mode (bench/serving/sim_run.py).
Both rejection modes scale their decode step estimate by ``tbt_correction``: the running ratio of the mean token
gap finished requests reported to the step time the planner predicts *for the batches they actually ran in*. The
planner's fit is a fit: on other hardware, or under other load than its calibration saw, it misses by a steady
factor (in the trace suite the machines ran ~1.3x slower at large batches than the fit, and both modes admitted
into TBT misses). What it must not learn is load: comparing the gap with the step predicted *at placement* (the
batch then, often 1 at the head of a burst) taught it "the machine is 3-4x slower" whenever a burst filled the
batch after a request joined; the forecast already adds that batch, so the over-prediction doubled it and the live
``load`` default answered 429 ``tbt_slo`` to bursts of 8 that ran at ~1 s gaps against a 2 s SLO. So every decode
heartbeat adds the step predicted for its reported batch to each request decoding there
(:meth:`Ledger.observe_decode`), and a finish compares its mean gap with their mean (with no heartbeat in its
window, with the step predicted at placement). The ratio is clamped to [0.5, 2]: one request stuck behind a
KV-blocked head, or a gap stretched by a prefill sharing the cores, must not swing admission by itself.
The TTFT check scales the predicted TTFT by ``ttft_correction``: the TTFTs the gateway measured (from the request's
arrival: tokenizing, placing, queueing, prefill) over those predicted at placement, each summed over the recent
requests and pulled towards 1 while few are in; predictions under ``MIN_PREDICTED_TTFT_S`` are not learnt from
(why a sum, not a percentile of per-request ratios: at ``TTFT_RATIO_SAMPLES``). On one shared CPU the gateway's own
work under a flood of requests takes cores the calibration gave to prefill: at 10x overload the accepted requests'
TTFT ran 2-3x past the prediction until this was learnt.
"""

from __future__ import annotations

import bisect
import threading
from collections import deque
from dataclasses import dataclass

MIN_GAPS_TO_LEARN = 8  # output tokens a finished request needs before its mean gap corrects the planner
CORRECTION_RANGE = (0.5, 2.0)  # one finish's observed/predicted ratio is clamped to this before it is averaged in
TTFT_CORRECTION_RANGE = (0.5, 4.0)
# The TTFT correction is the recent requests' measured TTFT over their predicted TTFT, in sum (not a percentile of
# per-request ratios): the engine batches prompts, so the first request of a batch waits for the whole batch and its
# own ratio overstates the plan's error (a burst of 8 long prompts on a quiet machine: the first predicted at 2.5 s
# took 16 s, the batch as a whole 2.4x its plan). The 90th percentile of ratios, used before, went to its 4x clamp
# on that first batch and refused the rest of a burst the machine served; the SLO's tail is now held by the SLO's
# burst headroom (cost_model.py) and the queue cap.
TTFT_RATIO_SAMPLES = 64
# Until this many TTFTs are in, the correction is pulled towards the plan (1.0) in proportion: a cluster's first
# request (cold caches: 4.6 s against 0.17 s predicted) must not set it alone.
TTFT_PRIOR_SAMPLES = 16
# Below this a ratio says more about the fixed costs around prefill (HTTP, tokenizing, two gRPC hops: ~0.3 s on a busy
# 2-core machine) than about the planner: two 37-token chats predicted at 0.08-0.17 s and served in 0.4 s and (cold)
# 7.9 s taught "4x" and refused a burst of long prompts that the plan had right.
MIN_PREDICTED_TTFT_S = 0.5


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
    predicted_tbt_s: float = 0.0  # the decode step time predicted at placement
    observed_step_sum_s: float = 0.0  # the steps predicted for the decode batches heartbeats reported while it ran
    observed_steps: int = 0
    block_hashes: tuple[int, ...] = ()  # the prompt's full-block hashes: its prefill leaves them in its instance's cache

    @property
    def planned_tbt_s(self) -> float:
        """The step the planner predicts for the batches this request ran in (placement's guess before any beat)."""
        return self.observed_step_sum_s / self.observed_steps if self.observed_steps else self.predicted_tbt_s

    @property
    def kv_tokens(self) -> int:
        return self.prompt_tokens + self.expected_output


class Ledger:
    def __init__(self, default_output_tokens: int = 256, ema_weight: float = 0.05, release_confidence: float = 0.95,
                 output_sample_size: int = 1000, recent_finish_horizon_s: float = 600.0) -> None:
        if not 0.0 < release_confidence <= 1.0:
            raise ValueError("release_confidence must be in (0, 1]")
        self._inflight: dict[str, InFlight] = {}
        self._lock = threading.Lock()
        self.mean_output_tokens = float(default_output_tokens)
        self.mean_tbt_s = 0.0  # seconds per output token in decode, learnt from finished requests
        self.tbt_correction = 1.0  # observed mean gap / predicted step time, learnt from finished requests
        self.ttft_correction = 1.0  # observed TTFT / TTFT predicted at placement, learnt from finished requests
        self._ttft_samples: deque[tuple[float, float]] = deque(maxlen=TTFT_RATIO_SAMPLES)  # (measured, predicted)
        self.ema_weight = ema_weight
        self.release_confidence = release_confidence
        self.output_sample_size = output_sample_size
        self.recent_finish_horizon_s = recent_finish_horizon_s  # far longer than any heartbeat interval
        self.clock = 0.0  # the latest time the ledger was told: the stamp of a Finish that carries none
        self._recent: deque[tuple[float, str, int]] = deque()  # (finished at, decode id, KV tokens freed)
        self._outputs: deque[int] = deque()  # recent output lengths, in finish order ...
        self._sorted_outputs: list[int] = []  # ... and sorted: an empirical distribution

    def expected_output(self, max_tokens: int) -> int:
        """Output length to plan for: the running mean of finished requests, capped by the request's limit."""
        mean = max(1, round(self.mean_output_tokens))
        return min(max_tokens, mean) if max_tokens > 0 else mean

    def add(self, entry: InFlight) -> None:
        with self._lock:
            self.clock = max(self.clock, entry.placed_at)
            self._inflight[entry.request_id] = entry

    def finish(self, request_id: str, completion_tokens: int | None = None, mean_tbt_s: float | None = None,
               now: float | None = None, ttft_s: float | None = None) -> InFlight | None:
        """Forget a request; learn from its output length and its mean time per output token when given.

        ``now`` is when it finished (default: the latest time the ledger saw, which can predate a heartbeat
        that still counted this request, so callers with a clock should pass it).
        """
        with self._lock:
            entry = self._inflight.pop(request_id, None)
            if entry is not None:
                out = completion_tokens if completion_tokens is not None else entry.expected_output
                self._recent.append((self.clock if now is None else now, entry.decode_id, entry.prompt_tokens + out))
            w = self.ema_weight
            predicted_ttft = entry.decode_start - entry.placed_at if entry is not None else 0.0
            if ttft_s is not None and ttft_s > 0 and predicted_ttft >= MIN_PREDICTED_TTFT_S:
                low, high = TTFT_CORRECTION_RANGE
                self._ttft_samples.append((ttft_s, predicted_ttft))
                ratio = sum(m for m, _ in self._ttft_samples) / sum(p for _, p in self._ttft_samples)
                known = min(1.0, len(self._ttft_samples) / TTFT_PRIOR_SAMPLES)
                self.ttft_correction = min(high, max(low, known * ratio + (1.0 - known)))
            if completion_tokens is not None and completion_tokens > 0:
                self._remember_output(completion_tokens)
                self.mean_output_tokens = (1 - w) * self.mean_output_tokens + w * completion_tokens
            if mean_tbt_s is not None and mean_tbt_s > 0:
                self.mean_tbt_s = mean_tbt_s if self.mean_tbt_s == 0 else (1 - w) * self.mean_tbt_s + w * mean_tbt_s
                # Short outputs say little: their mean gap is mostly the first one, which also waits for the
                # step in progress to end before joining.
                if entry is not None and entry.planned_tbt_s > 0 and (completion_tokens or 0) >= MIN_GAPS_TO_LEARN:
                    low, high = CORRECTION_RANGE
                    ratio = min(high, max(low, mean_tbt_s / entry.planned_tbt_s))
                    self.tbt_correction = (1 - w) * self.tbt_correction + w * ratio
            return entry

    def observe_decode(self, decode_id: str, step_s: float, now: float) -> None:
        """A heartbeat of ``decode_id`` reported a batch the planner puts at ``step_s`` per step: every request
        decoding there (by its estimated decode start) ran a step of about that size."""
        if step_s <= 0:
            return
        with self._lock:
            for e in self._inflight.values():
                if e.decode_id == decode_id and e.decode_start <= now:
                    e.observed_step_sum_s += step_s
                    e.observed_steps += 1

    def _remember_output(self, n: int) -> None:
        self._outputs.append(n)
        bisect.insort(self._sorted_outputs, n)
        if len(self._outputs) > self.output_sample_size:
            old = self._outputs.popleft()
            del self._sorted_outputs[bisect.bisect_left(self._sorted_outputs, old)]

    def finish_probability(self, done_tokens: float, by_tokens: float, expected: int) -> float:
        """P(output <= by_tokens | output > done_tokens) from recent outputs; before any, a step at ``expected``."""
        xs = self._sorted_outputs
        if not xs:
            return 1.0 if done_tokens < expected <= by_tokens else 0.0
        longer = len(xs) - bisect.bisect_right(xs, done_tokens)
        if longer == 0:  # running longer than any recent output: no basis to expect it to end soon
            return 0.0
        return (bisect.bisect_right(xs, by_tokens) - (len(xs) - longer)) / longer

    def prune(self, placed_before: float) -> int:
        """Forget requests placed before ``placed_before`` whose Finish never came (a crashed gateway)."""
        with self._lock:
            stale = [rid for rid, e in self._inflight.items() if e.placed_at < placed_before]
            for rid in stale:
                del self._inflight[rid]
        return len(stale)

    def pending_prefix(self, instance_id: str, hashes: tuple[int, ...]) -> int:
        """Longest prefix of ``hashes`` that a request admitted to prefill on ``instance_id`` shares: queued ahead
        of a new request there, it leaves those blocks in the instance's cache before the new one runs (the KV index
        learns of them only once they are computed). Without this a burst of prompts sharing a prefix was planned as
        if each computed all of it: 32 prompts of ~850 tokens behind 4 prefixes predicted ~4x the real queue."""
        if not hashes:
            return 0
        best = 0
        with self._lock:
            for e in self._inflight.values():
                if e.prefill_id != instance_id or not e.block_hashes or e.block_hashes[0] != hashes[0]:
                    continue
                n = 0
                for a, b in zip(e.block_hashes, hashes, strict=False):
                    if a != b:
                        break
                    n += 1
                best = max(best, n)
        return best

    def __len__(self) -> int:
        return len(self._inflight)

    def reserved(self, instance_id: str, since: float, now: float | None = None) -> tuple[int, int, int]:
        """(requests, prefill tokens, context tokens) placed on ``instance_id`` after time ``since``.

        With ``now``, the prefill tokens of a request the plan says has left prefill by then (its TTFT predicted at
        placement, scaled by the learnt ``ttft_correction``, has passed) no longer count in its prefill instance's
        queue: counting every placement since the last heartbeat as queued charged a short prompt's prefill to every
        request behind it for up to a heartbeat after it was done (the simulator's 1 s reports over sub-second
        prefills predicted queues of work already finished and refused on TTFT what it could serve). The request
        itself still counts until the next heartbeat: the queue cap must hold when the plan is wrong (an uncalibrated
        model's 20 ms prefills would otherwise empty a queue that takes seconds).
        """
        requests = prefill_tokens = context = 0
        with self._lock:
            for e in self._inflight.values():
                if e.placed_at < since:  # the heartbeat at `since` already counted it
                    continue
                # an aggregated worker holds both halves of a request: it is one request in its engine
                requests += instance_id in (e.prefill_id, e.decode_id)
                if e.prefill_id == instance_id and (
                        now is None or e.placed_at + (e.decode_start - e.placed_at) * self.ttft_correction > now):
                    prefill_tokens += e.new_prefill_tokens
                if e.decode_id == instance_id:
                    context += e.prompt_tokens
        return requests, prefill_tokens, context

    def _finished_since(self, decode_id: str, reported_at: float, now: float) -> tuple[int, int]:
        """(requests, KV tokens) finished on ``decode_id`` after its report at ``reported_at``."""
        while self._recent and self._recent[0][0] < now - self.recent_finish_horizon_s:
            self._recent.popleft()
        n = kv = 0
        for stamp, did, freed in self._recent:
            if did == decode_id and stamp >= reported_at:
                n, kv = n + 1, kv + freed
        return n, kv

    def predict_decode_change(self, decode_id: str, reported_at: float, now: float, at: float,
                              waiting: int = 0, hashes: tuple[int, ...] = (), block_size: int = 0,
                              ) -> tuple[int, int, int]:
        """(batch, context tokens, KV tokens) to add to ``decode_id``'s load reported at ``reported_at`` to
        forecast it at ``at`` (>= ``now``); ``waiting`` = requests the report shows queued for KV (not in its
        used KV). See the module docstring for what is added and removed.

        KV is counted once per prompt block (``block_size`` tokens; the engine's prefix cache shares them): a
        landing request's blocks that a request already there (or landing before it) holds add nothing, and the
        new request's own ``hashes`` held there come off the result (its caller adds its whole need). Counted in
        full, a burst of 32 prompts behind 4 shared 768-token prefixes was planned at 4.5x its KV, and the KV check
        refused 18 of them (429 tbt_slo) on a decode instance that had room for all.
        """
        with self._lock:
            self.clock = max(self.clock, now)
            n_done, kv_done = self._finished_since(decode_id, reported_at, now)
            batch, context, kv = -n_done, -kv_done, -kv_done
            reported_kv = reported_n = 0
            held: set[int] = set()  # prompt blocks the forecast already has on the instance
            landing: list[InFlight] = []
            for e in self._inflight.values():
                if e.decode_id != decode_id:
                    continue
                if e.decode_start > reported_at:  # not in the report yet: lands before `at`, or after us
                    if e.decode_start <= at:
                        landing.append(e)
                    continue
                reported_kv, reported_n = reported_kv + e.kv_tokens, reported_n + 1
                # The step time planned at placement, corrected by what finished requests showed: a request on a
                # machine slower than the fit is further from done than the plan says. (The learnt mean gap alone
                # includes decode-queue waits.)
                tpt = max(e.planned_tbt_s * self.tbt_correction, 1e-6)
                p = self.finish_probability((now - e.decode_start) / tpt, (at - e.decode_start) / tpt,
                                            e.expected_output)
                if p >= self.release_confidence:
                    batch, context, kv = batch - 1, context - e.kv_tokens, kv - e.kv_tokens
                elif block_size > 0:
                    held.update(e.block_hashes)
            for e in sorted(landing, key=lambda e: e.decode_start):
                shared = len(held.intersection(e.block_hashes)) * block_size if block_size > 0 else 0
                batch, context, kv = batch + 1, context + e.prompt_tokens, kv + e.kv_tokens - shared
                if block_size > 0:
                    held.update(e.block_hashes)
            if block_size > 0 and hashes:
                kv -= len(held.intersection(hashes)) * block_size
        if waiting > 0 and reported_n > 0:
            kv += round(waiting * reported_kv / reported_n)
        return batch, context, kv
