"""The decode load forecast for the moment a request would reach decode (Mooncake §7), used by the
``predicted`` early rejection (the ``mooncake`` policy picks decode on current load: see
policies.pick_decode_with_triage for why).

Anchored on the decode instance's last report (what is really running), moved forward by the ledger: minus what
finished since, plus admitted requests landing before then, minus requests all but sure to be done (ledger.py).
The step time is the planner's own (callers that compare it with the SLO scale it by the ledger's learnt
``tbt_correction``; placements record it unscaled, since that correction is learnt against them).
"""

from __future__ import annotations

from crescent.services.conductor.cluster import InstanceState, Request
from crescent.services.conductor.view import ClusterView


def kv_need(view: ClusterView, req: Request) -> int:
    """KV tokens to plan for the request on decode: its prompt and its expected output."""
    return req.prompt_tokens + view.ledger.expected_output(req.max_tokens)


def decode_at(view: ClusterView, d: InstanceState, req: Request, arrival: float) -> tuple[float, int]:
    """(TBT, KV tokens in use) on decode instance ``d`` at time ``arrival``, with ``req`` joined."""
    tbt, kv, _ = decode_forecast(view, d, req, arrival)
    return tbt, kv


def decode_forecast(view: ClusterView, d: InstanceState, req: Request, arrival: float) -> tuple[float, int, int]:
    """:func:`decode_at`, plus how many other requests the forecast puts in the batch ``req`` joins."""
    # At the arrival only: counting admitted requests that land later in its decode window too (tried) cost
    # goodput on the trace suite, and each of those is checked against the SLO when it is placed.
    batch, context, kv = view.ledger.predict_decode_change(d.instance_id, d.last_heartbeat, view.now, arrival,
                                                           d.load.waiting, req.block_hashes, req.block_size)
    used = (d.load.total_kv_blocks - d.load.free_kv_blocks) * d.info.kv_block_size
    others = max(0, d.load.running + d.load.waiting + batch)
    tbt = view.cost.decode_step_time(others + 1, max(0, d.load.running_context_tokens + context) + req.prompt_tokens)
    return tbt, max(0, used + kv) + kv_need(view, req), others
