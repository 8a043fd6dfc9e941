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
The queue cap (``Slo.max_queue_per_instance``) always applies; upstream it becomes HTTP 429 + Retry-After.
"""

from __future__ import annotations

from collections.abc import Callable

from crescent.services.conductor.cluster import Placement, Rejection, Request, Slo
from crescent.services.conductor.view import ClusterView

REJECTION_MODES = ("none", "load", "predicted")


def _queue_full(view: ClusterView, p: Placement, slo: Slo) -> Rejection | None:
    inst = p.prefill
    if inst.queued_requests >= slo.max_queue_per_instance:
        drain = view.cost.queue_time(inst.queued_requests, inst.queued_prefill_tokens)
        return Rejection("queue_full", retry_after_s=max(1.0, drain))
    return None


def _ttft(view: ClusterView, p: Placement, slo: Slo) -> Rejection | None:
    if p.predicted_ttft_s > slo.ttft_s:
        return Rejection("ttft_slo", retry_after_s=max(1.0, p.predicted_ttft_s - slo.ttft_s))
    return None


def _check_none(view: ClusterView, p: Placement, req: Request, slo: Slo) -> Rejection | None:
    return None


def _kv_need(view: ClusterView, req: Request) -> int:
    return req.prompt_tokens + view.ledger.expected_output(req.max_tokens)


def _check_load(view: ClusterView, p: Placement, req: Request, slo: Slo) -> Rejection | None:
    if (r := _ttft(view, p, slo)) is not None:
        return r
    d = p.decode
    tbt_now = view.cost.decode_step_time(d.batch + 1, d.context_tokens + req.prompt_tokens)
    free_tokens = d.load.free_kv_blocks * d.info.kv_block_size - d.reserved_context_tokens
    if tbt_now > slo.tbt_s or (d.load.total_kv_blocks > 0 and free_tokens < _kv_need(view, req)):
        return Rejection("tbt_slo", retry_after_s=1.0)
    return None


def predicted_decode_at_arrival(view: ClusterView, p: Placement, req: Request) -> tuple[float, int]:
    """(TBT, KV tokens in use) on the chosen decode instance when this request would get there, with it.

    Anchored on the decode instance's last report (what is really running), moved forward by the ledger.
    """
    d = p.decode
    arrival = view.now + p.predicted_ttft_s
    batch, context, kv = view.ledger.predict_decode_change(d.instance_id, d.last_heartbeat, view.now, arrival,
                                                           d.load.waiting)
    used = (d.load.total_kv_blocks - d.load.free_kv_blocks) * d.info.kv_block_size
    tbt = view.cost.decode_step_time(max(0, d.load.running + d.load.waiting + batch) + 1,
                                     max(0, d.load.running_context_tokens + context) + req.prompt_tokens)
    return tbt, max(0, used + kv) + _kv_need(view, req)


def _check_predicted(view: ClusterView, p: Placement, req: Request, slo: Slo) -> Rejection | None:
    if (r := _ttft(view, p, slo)) is not None:
        return r
    tbt, kv_tokens = predicted_decode_at_arrival(view, p, req)
    d = p.decode
    capacity = d.load.total_kv_blocks * d.info.kv_block_size
    if tbt > slo.tbt_s or (capacity > 0 and kv_tokens > capacity):
        return Rejection("tbt_slo", retry_after_s=max(1.0, p.predicted_ttft_s))
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
