"""Hand-built cluster views for policy and rejection tests; a synthetic engine for calibration tests."""

from __future__ import annotations

import random

from crescent.services.conductor.cluster import InstanceInfo, InstanceState, Load, Request, Role, Tier
from crescent.services.conductor.cost_model import CostModel
from crescent.services.conductor.kv_index import KvEventKind, KvIndex
from crescent.services.conductor.ledger import Ledger
from crescent.services.conductor.view import ClusterView

BS = 16
# Round numbers so expected times can be worked out by hand: 1 ms per prefill token, no attention term.
COST = CostModel(prefill_s=(0.0, 1e-3, 0.0), decode_step_s=(0.01, 1e-3, 1e-5), kv_bytes_per_token=1000,
                 bandwidth_bps={"DEVICE": 1e6, "DRAM": 1e7, "SSD": 1e6}, transfer_latency_s=0.0)


def inst(iid: str, role: Role, **load) -> InstanceState:
    return InstanceState(InstanceInfo(iid, role, address=f"{iid}:1", kv_block_size=BS), Load(**load))


def request(blocks: int, prompt: int | None = None, max_tokens: int = 32, rid: str = "r") -> Request:
    hashes = tuple(range(1000, 1000 + blocks))
    return Request(rid, prompt if prompt is not None else blocks * BS + 1, max_tokens, hashes, BS)


def view(prefill: list[InstanceState], decode: list[InstanceState], kvstore: list[InstanceState] | None = None,
         index: KvIndex | None = None, now: float = 0.0, seq: int = 0, ledger: Ledger | None = None,
         ) -> ClusterView:
    return ClusterView(prefill=prefill, decode=decode, kvstore=kvstore or [], index=index or KvIndex(), cost=COST,
                       ledger=ledger if ledger is not None else Ledger(), now=now, seq=seq)


def cache(index: KvIndex, iid: str, blocks: int, tier: Tier = Tier.DEVICE) -> None:
    index.apply(iid, KvEventKind.STORED, list(range(1000, 1000 + blocks)), tier)


TRUE_PREFILL = (0.01, 2e-4, 3e-8)
TRUE_DECODE = (0.02, 5e-4, 2e-7)


class SyntheticEngine:
    """Timings from known coefficients plus 1% noise: the fit must recover them."""

    kv_bytes_per_token = 4096

    def __init__(self) -> None:
        self.rng = random.Random(0)
        self.truth = CostModel(prefill_s=TRUE_PREFILL, decode_step_s=TRUE_DECODE)

    def _noise(self) -> float:
        return 1 + self.rng.uniform(-0.01, 0.01)

    def time_prefill(self, new_tokens: int, cached_tokens: int) -> float:
        return self.truth.prefill_time(new_tokens, cached_tokens) * self._noise()

    def time_decode_step(self, batch: int, context_per_seq: int) -> float:
        return self.truth.decode_step_time(batch, batch * context_per_seq) * self._noise()
