"""Early rejection: refuse a request before any prefill work is spent on it (Mooncake §6).

Modes:
- ``none``: only the queue cap.
- ``load``: also reject when the TTFT estimate breaks the TTFT SLO, or when the chosen decode instance's
  *current* load plus this request breaks the TBT SLO or does not fit its free KV blocks (it would wait in the
  decode queue, and that wait is a token gap).
- ``predicted``: the TTFT check, plus the decode load *predicted for the moment this request reaches decode*
  (now + predicted TTFT): the decode instance's last report, minus what finished since, plus the admitted
  requests that land before then, minus the requests all but sure to have finished by then (see ledger.py).
  Current load misses the admitted prefills about to land and the finishes since the last heartbeat.
Both decode checks scale the planner's step time by the ledger's learnt ``tbt_correction`` (see ledger.py) and
hold it under ``tbt_s / cost.decode_tail_ratio`` (the SLO binds the slowest gaps; the fit predicts a middle one).
The TTFT check scales the predicted TTFT by the ledger's learnt ``ttft_correction`` likewise.
A decode instance with nothing else running (nor admitted towards it) is never refused on TBT, only on KV, and a
prefill instance with nothing queued never on TTFT: a lone request runs as fast as the machine can, so refusing it
serves no one, and a correction learnt too high would otherwise refuse everything and, with no finishes left to
learn from, never come down.
Retry-After says when to come back: for ``ttft_slo`` the predicted TTFT past the SLO, for ``queue_full`` the
queue's drain time, for ``tbt_slo`` the time until the chosen decode instance is likely to finish one request (a
request's expected decode time over the batch it shares), at least 1 s.
Below the load where decode saturates, ``load`` and ``predicted`` make the same decisions: they share the TTFT
check, and only the decode check differs (the trace suite's prefill-bound points reject on ``ttft_slo`` alone).
The queue cap (``Slo.max_queue_per_instance``) always applies; upstream it becomes HTTP 429 + Retry-After.
"""

from __future__ import annotations

from collections.abc import Callable

from crescent.services.conductor.cluster import Placement, Rejection, Request, Slo
from crescent.services.conductor.forecast import decode_forecast, kv_need
from crescent.services.conductor.view import ClusterView

REJECTION_MODES = ("none", "load", "predicted")


def _queue_full(view: ClusterView, p: Placement, slo: Slo) -> Rejection | None:
    inst = p.prefill
    if inst.queued_requests >= slo.max_queue_per_instance:
        drain = view.cost.queue_time(inst.queued_requests, inst.queued_prefill_tokens)
        return Rejection("queue_full", retry_after_s=max(1.0, drain))
    return None


def _ttft(view: ClusterView, p: Placement, slo: Slo) -> Rejection | None:
    ttft = p.predicted_ttft_s * view.ledger.ttft_correction
    # An empty prefill queue is never refused on TTFT: the request starts at once (see the module docstring).
    if ttft > slo.ttft_s and p.prefill.queued_requests > 0:
        return Rejection("ttft_slo", retry_after_s=max(1.0, ttft - slo.ttft_s))
    return None


def _tbt_limit(view: ClusterView, slo: Slo) -> float:
    # The SLO binds a request's slowest gaps; the fitted step is a middle one (cost_model.decode_tail_ratio).
    return slo.tbt_s / view.cost.decode_tail_ratio


def _tbt_refusal(view: ClusterView, req: Request, step_s: float, batch: int, wait_s: float = 0.0) -> Rejection:
    """``tbt_slo``, to come back after ``wait_s`` plus the time the decode instance takes to finish one of its
    ``batch`` requests (each needs about the expected output's worth of steps, and they end spread out)."""
    one_done = step_s * view.ledger.expected_output(req.max_tokens) / max(1, batch)
    return Rejection("tbt_slo", retry_after_s=max(1.0, wait_s + one_done))


def _check_none(view: ClusterView, p: Placement, req: Request, slo: Slo) -> Rejection | None:
    return None


def _check_load(view: ClusterView, p: Placement, req: Request, slo: Slo) -> Rejection | None:
    if (r := _ttft(view, p, slo)) is not None:
        return r
    d = p.decode
    tbt_now = view.cost.decode_step_time(d.batch + 1, d.context_tokens + req.prompt_tokens)
    tbt_now *= view.ledger.tbt_correction
    free_tokens = d.load.free_kv_blocks * d.info.kv_block_size - d.reserved_context_tokens
    if (d.batch > 0 and tbt_now > _tbt_limit(view, slo)) or (
            d.load.total_kv_blocks > 0 and free_tokens < kv_need(view, req)):
        return _tbt_refusal(view, req, tbt_now, d.batch + 1)
    return None


def predicted_decode_at_arrival(view: ClusterView, p: Placement, req: Request) -> tuple[float, int, int]:
    """(TBT, KV tokens in use, other requests in its batch) on the chosen decode instance when this request would
    get there, with it."""
    return decode_forecast(view, p.decode, req, view.now + p.predicted_ttft_s)


def _check_predicted(view: ClusterView, p: Placement, req: Request, slo: Slo) -> Rejection | None:
    if (r := _ttft(view, p, slo)) is not None:
        return r
    tbt, kv_tokens, others = predicted_decode_at_arrival(view, p, req)
    tbt *= view.ledger.tbt_correction
    d = p.decode
    capacity = d.load.total_kv_blocks * d.info.kv_block_size
    if (others > 0 and tbt > _tbt_limit(view, slo)) or (capacity > 0 and kv_tokens > capacity):
        return _tbt_refusal(view, req, tbt, others + 1, wait_s=p.predicted_ttft_s)
    return None


_CHECKS: dict[str, Callable[[ClusterView, Placement, Request, Slo], Rejection | None]] = {
    "none": _check_none,
    "load": _check_load,
    "predicted": _check_predicted,
}


def check_admission(mode: str, view: ClusterView, placement: Placement, req: Request, slo: Slo,
                    ) -> Rejection | None:
    """None to admit, else why not. Raises ValueError for an unknown mode."""
    check = _CHECKS.get(mode)
    if check is None:
        raise ValueError(f"unknown rejection mode {mode!r}; choose one of {list(REJECTION_MODES)}")
    if (r := _queue_full(view, placement, slo)) is not None:
        return r
    return check(view, placement, req, slo)
