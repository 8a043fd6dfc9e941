"""Placement policies: pure functions of (cluster view, request) -> Placement, or Rejection when nothing can serve.

The same functions run in the live conductor and in the simulator (bench/serving/sim.py). An aggregated worker
(Role.WORKER) sits in both pools; when a policy picks one for prefill, decode goes to the same instance
(``_placement``), so the prompt's KV stays in its engine and every policy stays one pick per pool. Early
rejection by SLO is separate (rejection.py) so every policy can be combined with every rejection mode.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from crescent.services.conductor.cluster import InstanceState, Placement, Rejection, Request, Role, Tier
from crescent.services.conductor.view import ClusterView

Policy = Callable[[ClusterView, Request], Placement | Rejection]


@dataclass
class PrefillEstimate:
    """One prefill instance's predicted TTFT for a request, and where its reused prefix would come from."""

    instance: InstanceState
    ttft_s: float
    cached_blocks: int
    source: str = ""
    tier: Tier | None = None
    remote: bool = False  # prefix fetched from another prefill instance (replicates it there)


def _usable_blocks(req: Request, n: int) -> int:
    # At least one prompt token must be computed: its logits give the first output token.
    return max(0, min(n, len(req.block_hashes), (req.prompt_tokens - 1) // req.block_size))


def own_prefix(view: ClusterView, instance_id: str, req: Request) -> int:
    """Prefix blocks ``instance_id`` will hold when ``req`` runs there: those the KV index lists in its cache, or
    those a request queued ahead of it on that instance computes first (``Ledger.pending_prefix``)."""
    return max(len(view.index.prefix_tiers(instance_id, req.block_hashes)),
               view.ledger.pending_prefix(instance_id, req.block_hashes))


def _option(view: ClusterView, inst: InstanceState, req: Request, blocks: int, transfer_s: float) -> float:
    cached = blocks * req.block_size
    return transfer_s + view.cost.prefill_time(req.prompt_tokens - cached, cached)


def estimate_prefill(view: ClusterView, inst: InstanceState, req: Request, remote_best: tuple[str, int] | None,
                     ) -> PrefillEstimate:
    """TTFT on ``inst`` = queue time + time to bring the reusable prefix + prefill of the rest (Algorithm 1).

    Candidates for the prefix: the instance's own cache (free), each store's copy (read at its tiers'
    bandwidths), and, when ``remote_best`` (another prefill instance's much longer prefix) is given, that one over
    the network. Recomputing is always a candidate, so a slow tier never makes a prefix worth loading.
    """
    cost, hashes = view.cost, req.block_hashes
    queue = cost.queue_time(inst.queued_requests, inst.queued_prefill_tokens)
    own = _usable_blocks(req, own_prefix(view, inst.instance_id, req))
    best = PrefillEstimate(inst, queue + _option(view, inst, req, own, 0.0), own,
                           inst.instance_id if own else "", Tier.DEVICE if own else None)
    for store in view.kvstore:
        tiers = view.index.prefix_tiers(store.instance_id, hashes)
        n = _usable_blocks(req, len(tiers))
        if n <= own:
            continue
        t = queue + _option(view, inst, req, n, cost.tiers_transfer_time(tiers[own:n], req.block_size))
        if t < best.ttft_s:
            best = PrefillEstimate(inst, t, n, store.instance_id, max(tiers[own:n]))
    if remote_best is not None:
        holder, n = remote_best
        n = _usable_blocks(req, n)
        if holder != inst.instance_id and n > own:
            moved = cost.transfer_time((n - own) * req.block_size, Tier.DEVICE)
            t = queue + _option(view, inst, req, n, moved)
            if t < best.ttft_s:
                best = PrefillEstimate(inst, t, n, holder, Tier.DEVICE, remote=True)
    return best


def _decode_tbt(view: ClusterView, inst: InstanceState, req: Request) -> float:
    return view.cost.decode_step_time(inst.batch + 1, inst.context_tokens + req.prompt_tokens)


def _has_room(inst: InstanceState, req: Request) -> bool:
    if inst.load.total_kv_blocks <= 0:
        return True  # the instance did not report capacity
    need = -(-(req.prompt_tokens + req.max_tokens) // max(inst.info.kv_block_size, 1))
    return inst.load.free_kv_blocks >= need


def pick_decode(view: ClusterView, req: Request) -> tuple[InstanceState, float]:
    """The decode instance with the lowest predicted TBT among those with KV room (all, if none has room)."""
    pool = [d for d in view.decode if _has_room(d, req)] or view.decode
    best = min(pool, key=lambda d: (_decode_tbt(view, d, req), d.batch, d.instance_id))
    return best, _decode_tbt(view, best, req)


def tbt_budget(view: ClusterView) -> float:
    """The planner's step time a decode instance may reach and still keep the TBT SLO, in the planner's units
    (the same bound early rejection holds: rejection.py's ``_tbt_limit`` over the ledger's ``tbt_correction``)."""
    return view.slo.tbt_s / view.cost.decode_tail_ratio / max(view.ledger.tbt_correction, 1e-9)


def _reported_tbt(view: ClusterView, d: InstanceState, req: Request) -> float:
    """The step time ``d``'s last report implies with ``req`` joined: no reservations, no forecast."""
    return view.cost.decode_step_time(d.load.running + d.load.waiting + 1,
                                      d.load.running_context_tokens + req.prompt_tokens)


def pick_decode_with_triage(view: ClusterView, req: Request) -> tuple[InstanceState, float]:
    """``pick_decode``, except under sustained overload: then the instance furthest past the TBT budget.

    Overload = every instance with room is past the budget both by its report plus the work placed since
    (``_decode_tbt``) and by its report alone (so a burst of placements the reports have not confirmed is no
    overload). The request then meets its SLO nowhere; on the least loaded instance it would push that
    instance's requests out of their SLO too, while on the most loaded one it costs only requests already past
    it. Without early rejection this is the only way a conductor keeps overload off the instances still within
    SLO (FAST'25 §6's aim, by placement); with rejection, admission refuses such a request on any instance.

    Decode is picked on current load, as in FAST'25's Algorithm 1, not on the ``predicted`` mode's forecast
    (forecast.py): picking the instance with the lowest forecast and then admitting on that same forecast
    selects for the forecast's optimistic errors (trace suite, bursty_chat x2.0, 1200 requests: 276 requests
    within SLO vs 558 for least_loaded under ``predicted``; 501 with this pick).
    """
    pool = [d for d in view.decode if _has_room(d, req)] or view.decode
    tbt = {d.instance_id: _decode_tbt(view, d, req) for d in pool}
    budget = tbt_budget(view)
    overloaded = all(tbt[d.instance_id] > budget and _reported_tbt(view, d, req) > budget for d in pool)
    best = (max if overloaded else min)(pool, key=lambda d: (tbt[d.instance_id], d.batch, d.instance_id))
    return best, tbt[best.instance_id]


def _no_instance(view: ClusterView) -> Rejection | None:
    if not view.prefill or not view.decode:
        return Rejection("no_instance", retry_after_s=1.0)
    return None


def _placement(view: ClusterView, req: Request, est: PrefillEstimate, decode: InstanceState, tbt: float,
               name: str, remote: int = 0) -> Placement:
    if est.instance.info.role == Role.WORKER and decode.instance_id != est.instance.instance_id:
        decode, tbt = est.instance, _decode_tbt(view, est.instance, req)  # both halves on one aggregated worker
    store = next((s for s in view.kvstore if s.instance_id == est.source), None) or (
        view.kvstore[0] if view.kvstore else None)
    return Placement(prefill=est.instance, decode=decode, kvstore=store, cached_blocks=est.cached_blocks,
                     predicted_ttft_s=est.ttft_s, predicted_tbt_s=tbt, prefix_source=est.source,
                     prefix_tier=est.tier, replicate_from=est.source if est.remote else "",
                     replicate_blocks=remote, policy=name)


def round_robin(view: ClusterView, req: Request) -> Placement | Rejection:
    """Cycle through instances, blind to load and cache (the baseline)."""
    if (r := _no_instance(view)) is not None:
        return r
    prefill = view.prefill[view.seq % len(view.prefill)]
    decode = view.decode[view.seq % len(view.decode)]
    return _placement(view, req, estimate_prefill(view, prefill, req, None), decode, _decode_tbt(view, decode, req),
                      "round_robin")


def least_loaded(view: ClusterView, req: Request) -> Placement | Rejection:
    """Shortest prefill queue (by estimated drain time); decode with the lowest predicted TBT."""
    if (r := _no_instance(view)) is not None:
        return r
    prefill = min(view.prefill, key=lambda p: (view.cost.queue_time(p.queued_requests, p.queued_prefill_tokens),
                                               p.instance_id))
    decode, tbt = pick_decode(view, req)
    return _placement(view, req, estimate_prefill(view, prefill, req, None), decode, tbt, "least_loaded")


def cache_aware(view: ClusterView, req: Request) -> Placement | Rejection:
    """Longest prefix in an instance's own cache; ties go to the shorter queue."""
    if (r := _no_instance(view)) is not None:
        return r

    def key(p: InstanceState) -> tuple[int, float, str]:
        return (-own_prefix(view, p.instance_id, req), view.cost.queue_time(p.queued_requests, p.queued_prefill_tokens), p.instance_id)

    prefill = min(view.prefill, key=key)
    decode, tbt = pick_decode(view, req)
    return _placement(view, req, estimate_prefill(view, prefill, req, None), decode, tbt, "cache_aware")


def mooncake(view: ClusterView, req: Request) -> Placement | Rejection:
    """Mooncake's KVCache-centric scheduling (FAST'25, Algorithm 1).

    Every prefill instance gets a TTFT estimate (queue + prefix transfer + prefill of the rest). When another
    prefill instance holds a prefix more than ``kvcache_balancing_threshold`` times longer than an instance's own,
    fetching it is weighed against recomputing; if fetching wins, the placement asks to replicate those (hot)
    blocks onto the chosen instance. The lowest TTFT wins; decode goes where the predicted TBT is lowest, or,
    under sustained decode overload, where the request tips no request still within SLO over
    (``pick_decode_with_triage``).
    """
    if (r := _no_instance(view)) is not None:
        return r
    # the prefix another instance could send is what it holds now; its own includes what its queue computes first
    held = {p.instance_id: len(view.index.prefix_tiers(p.instance_id, req.block_hashes)) for p in view.prefill}
    owns = {p.instance_id: own_prefix(view, p.instance_id, req) for p in view.prefill}
    holder = max(view.prefill, key=lambda p: (held[p.instance_id], -p.queued_prefill_tokens)).instance_id
    best_len = held[holder]
    estimates = []
    for p in view.prefill:
        own = owns[p.instance_id]
        far = best_len > view.kvcache_balancing_threshold * max(own, 1) or (own == 0 and best_len > 0)
        estimates.append(estimate_prefill(view, p, req, (holder, best_len) if far else None))
    est = min(estimates, key=lambda e: (e.ttft_s, e.instance.instance_id))
    decode, tbt = pick_decode_with_triage(view, req)
    remote = est.cached_blocks - owns[est.instance.instance_id] if est.remote else 0
    return _placement(view, req, est, decode, tbt, "mooncake", remote)


POLICIES: dict[str, Policy] = {
    "round_robin": round_robin,
    "least_loaded": least_loaded,
    "cache_aware": cache_aware,
    "mooncake": mooncake,
}


def get_policy(name: str) -> Policy:
    try:
        return POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; choose one of {sorted(POLICIES)}") from None
