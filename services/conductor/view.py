"""The snapshot a placement policy decides on (kept apart from cluster.py: it ties the cluster's state to the cost
model and the ledger, which themselves build on cluster.py's types)."""

from __future__ import annotations

from dataclasses import dataclass, field

from crescent.services.conductor.cluster import InstanceState, PrefixIndex, Slo
from crescent.services.conductor.cost_model import CostModel
from crescent.services.conductor.ledger import Ledger


@dataclass
class ClusterView:
    """One consistent snapshot a policy decides on: instances with load, where blocks live, costs, time."""

    prefill: list[InstanceState]
    decode: list[InstanceState]
    kvstore: list[InstanceState]
    index: PrefixIndex
    cost: CostModel
    ledger: Ledger
    now: float
    seq: int = 0  # placements made so far (round robin's cursor)
    kvcache_balancing_threshold: float = 2.0  # fetch a remote prefix only when it is this many times longer
    # The SLOs admission will hold the placement to: with them a policy can tell a decode instance that keeps the
    # TBT SLO from one that cannot (mooncake's triage).
    slo: Slo = field(default_factory=Slo)
