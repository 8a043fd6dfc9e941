"""The conductor's plain data: instances, their load, the clock, and the placement decision.

Everything here is free of gRPC and of the wall clock so that the live service and the simulator share the
policies unchanged (STYLE.md habit 2). The proto messages convert to and from these at the service edge.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


class Role(enum.IntEnum):
    """Values equal crescent.v1.Role so conversion is a cast."""

    PREFILL = 1
    DECODE = 2
    KVSTORE = 3
    WORKER = 4  # aggregated: prefill and decode in one engine


class Tier(enum.IntEnum):
    """Values equal crescent.v1.Tier; a lower value is a faster tier."""

    DEVICE = 1
    DRAM = 2
    SSD = 3


class Clock(Protocol):
    def now(self) -> float: ...


class WallClock:
    """Seconds since the epoch: comparable across conductor replicas that share Redis."""

    def now(self) -> float:
        return time.time()


class FakeClock:
    """A clock tests and the simulator move by hand."""

    def __init__(self, start: float = 0.0) -> None:
        self.t = start

    def now(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


@dataclass(frozen=True)
class InstanceInfo:
    instance_id: str
    role: Role
    address: str = ""
    data_address: str = ""
    transport: str = ""
    model_id: str = ""
    kv_block_size: int = 16


@dataclass
class Load:
    """What an instance reports with every heartbeat (the fields of crescent.v1.Load)."""

    waiting: int = 0
    running: int = 0
    free_kv_blocks: int = 0
    total_kv_blocks: int = 0
    queued_prefill_tokens: int = 0
    running_context_tokens: int = 0
    store_bytes_used: int = 0
    store_bytes_capacity: int = 0


@dataclass
class InstanceState:
    """An instance as a policy sees it: its last reported load plus work placed on it since that report."""

    info: InstanceInfo
    load: Load
    last_heartbeat: float = 0.0
    reserved_requests: int = 0
    reserved_prefill_tokens: int = 0
    reserved_context_tokens: int = 0

    @property
    def instance_id(self) -> str:
        return self.info.instance_id

    @property
    def queued_requests(self) -> int:
        return self.load.waiting + self.reserved_requests

    @property
    def queued_prefill_tokens(self) -> int:
        return self.load.queued_prefill_tokens + self.reserved_prefill_tokens

    @property
    def batch(self) -> int:
        return self.load.running + self.load.waiting + self.reserved_requests

    @property
    def context_tokens(self) -> int:
        return self.load.running_context_tokens + self.reserved_context_tokens


@dataclass(frozen=True)
class Request:
    """What the conductor knows about a request at placement time."""

    request_id: str
    prompt_tokens: int
    max_tokens: int
    block_hashes: tuple[int, ...]
    block_size: int = 16
    model_id: str = ""
    avoid: tuple[str, ...] = ()
    """Instances this request must not be placed on (they failed it; the gateway resumes it elsewhere)."""


@dataclass
class Placement:
    prefill: InstanceState
    decode: InstanceState
    kvstore: InstanceState | None
    cached_blocks: int  # prefix blocks the prefill instance reuses instead of computing
    predicted_ttft_s: float
    predicted_tbt_s: float
    prefix_source: str = ""  # instance id the reused prefix comes from ("" = nowhere / own cache)
    prefix_tier: Tier | None = None  # slowest tier the reused prefix is read from
    # Hot-prefix replication: copy this many prefix blocks from ``replicate_from`` to the prefill instance.
    replicate_from: str = ""
    replicate_blocks: int = 0
    policy: str = ""


@dataclass(frozen=True)
class Rejection:
    reason: str  # "queue_full", "ttft_slo", "tbt_slo", "no_instance"
    retry_after_s: float = 1.0


@dataclass
class Slo:
    ttft_s: float = 10.0
    tbt_s: float = 0.1
    max_queue_per_instance: int = 64


class PrefixIndex(Protocol):
    """What policies need from the KV index (in memory or in Redis)."""

    def prefix_tiers(self, instance_id: str, hashes: Sequence[int]) -> list[Tier]: ...
