"""The conductor's decision step, shared by the live service and the simulator.

``decide`` runs a policy, then early rejection, then records the admitted request in the ledger. ``Conductor``
wraps it with the registry and KV index the live service keeps (in memory or in Redis).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field

from crescent.services.conductor.cluster import InstanceState, Load, Placement, Rejection, Request, Role, Slo
from crescent.services.conductor.cost_model import CostModel
from crescent.services.conductor.kv_index import KvIndex
from crescent.services.conductor.ledger import InFlight, Ledger
from crescent.services.conductor.policies import get_policy
from crescent.services.conductor.registry import Registry
from crescent.services.conductor.rejection import REJECTION_MODES, check_admission
from crescent.services.conductor.view import ClusterView


def validate_request(req: Request) -> None:
    if req.prompt_tokens <= 0:
        raise ValueError("prompt_tokens must be positive")
    if req.block_size <= 0:
        raise ValueError("block_size must be positive")
    if len(req.block_hashes) > req.prompt_tokens // req.block_size:
        raise ValueError(f"{len(req.block_hashes)} block hashes for {req.prompt_tokens} prompt tokens in blocks "
                         f"of {req.block_size}: at most one hash per full block")


def decide(view: ClusterView, req: Request, policy: str, rejection: str, slo: Slo) -> Placement | Rejection:
    """Place or reject ``req`` on ``view``; an admitted request enters ``view.ledger``."""
    validate_request(req)
    result = get_policy(policy)(view, req)
    if isinstance(result, Rejection):
        return result
    refusal = check_admission(rejection, view, result, req, slo)
    if refusal is not None:
        return refusal
    expected = view.ledger.expected_output(req.max_tokens)
    start = view.now + result.predicted_ttft_s
    view.ledger.add(InFlight(
        request_id=req.request_id, prefill_id=result.prefill.instance_id, decode_id=result.decode.instance_id,
        prompt_tokens=req.prompt_tokens, new_prefill_tokens=req.prompt_tokens - result.cached_blocks * req.block_size,
        expected_output=expected, placed_at=view.now, decode_start=start, predicted_tbt_s=result.predicted_tbt_s,
        block_hashes=tuple(req.block_hashes)))
    return result


def add_reservations(states: list[InstanceState], ledger: Ledger, now: float | None = None,
                     ) -> list[InstanceState]:
    """Add the work placed on each instance since its last heartbeat (not yet in the load it reported), less the
    prefills the plan says are done by ``now`` (``Ledger.reserved``)."""
    for s in states:
        s.reserved_requests, s.reserved_prefill_tokens, s.reserved_context_tokens = ledger.reserved(
            s.instance_id, s.last_heartbeat, now)
    return states


@dataclass
class Conductor:
    """Registry + index + ledger + the configured policy and rejection mode."""

    registry: Registry
    index: KvIndex
    cost: CostModel = field(default_factory=CostModel)
    policy: str = "cache_aware"
    rejection: str = "load"
    slo: Slo = field(default_factory=Slo)
    ledger: Ledger = field(default_factory=Ledger)
    kvcache_balancing_threshold: float = 2.0
    suspect_after_s: float = math.inf
    """An instance silent this long is left out of placements (not dropped: its requests go on)."""
    stand_in: bool = True
    """While no prefill (decode) instance is live, place prefills (decodes) on the other role's workers."""

    def __post_init__(self) -> None:
        get_policy(self.policy)  # fail at start-up, not on the first request
        if self.rejection not in REJECTION_MODES:
            raise ValueError(f"unknown rejection mode {self.rejection!r}; choose one of {list(REJECTION_MODES)}")
        self._seq = 0
        self._lock = threading.Lock()

    def view(self, now: float, model_id: str = "", avoid: tuple[str, ...] = ()) -> ClusterView:
        states = [s for s in self.registry.instances()
                  if now - s.last_heartbeat <= self.suspect_after_s and s.instance_id not in avoid]
        if model_id:
            states = [s for s in states if s.info.role == Role.KVSTORE or s.info.model_id in ("", model_id)]
        states = add_reservations(states, self.ledger, now)

        def live(*roles: Role) -> list[InstanceState]:
            return [s for s in states if s.info.role in roles]

        # An aggregated worker is in both pools: one state object, so a reservation made for it counts once.
        prefill, decode = live(Role.PREFILL, Role.WORKER), live(Role.DECODE, Role.WORKER)
        if self.stand_in:  # a role with no live instance borrows the other role's workers (they serve both)
            prefill, decode = prefill or decode, decode or prefill
        return ClusterView(prefill=prefill, decode=decode,
                           kvstore=live(Role.KVSTORE),
                           index=self.index, cost=self.cost, ledger=self.ledger, now=now, seq=self._seq,
                           kvcache_balancing_threshold=self.kvcache_balancing_threshold, slo=self.slo)

    def place(self, req: Request, now: float) -> Placement | Rejection:
        # One placement at a time: reservations must see the previous decision, or a burst lands on one instance.
        with self._lock:
            result = decide(self.view(now, req.model_id, req.avoid), req, self.policy, self.rejection, self.slo)
            if isinstance(result, Placement):
                self._seq += 1
            return result

    def observe_heartbeat(self, instance_id: str, load: Load, now: float) -> None:
        """A decode-side heartbeat: tell the ledger the step the planner predicts for the batch it reported."""
        state = self.registry.get(instance_id)
        if state is not None and state.info.role in (Role.DECODE, Role.WORKER) and load.running > 0:
            self.ledger.observe_decode(instance_id, self.cost.decode_step_time(load.running,
                                                                               load.running_context_tokens), now)

    def finish(self, request_id: str, completion_tokens: int | None = None, mean_tbt_s: float | None = None,
               now: float | None = None, ttft_s: float | None = None) -> bool:
        """``now``: when it finished, on the clock ``place`` gets (the predicted mode subtracts finishes a decode
        instance's last heartbeat still counted)."""
        return self.ledger.finish(request_id, completion_tokens, mean_tbt_s, now, ttft_s) is not None
