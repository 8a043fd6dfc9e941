"""Shared state that survives its Redis: every write goes to a local copy and to Redis; reads come from Redis while
it answers and from the local copy while it does not.

Several conductor replicas share the registry and KV index through Redis. Without this layer, a Redis that restarts,
fails over or drops off the network would fail every Place and every heartbeat (each call raises), although each
replica holds most of what it needs. With it:

- **Redis down:** the first failing call marks the link down and logs once; from then on reads and writes use the
  replica's local copy (what it was told itself, plus what it last read from Redis), and Redis is probed at most
  every ``retry_s`` seconds, never on every call.
- **Redis back** (the same server, a restarted empty one, or a failover): the replica writes its local copy back
  (instances it knows and their blocks), then reads from Redis again. A Redis that restarted without an error ever
  reaching this replica (between two calls) is caught by a marker key that the resync writes: when it is gone,
  Redis lost its data, and the replica resyncs.

Reads from Redis refresh the local copy of the registry, so a replica that loses Redis still knows the instances
the other replicas registered. The KV index is not copied back on reads (it can be large): while Redis is down, a
replica places on the blocks reported to it, which is what a single conductor would do.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

import redis

from crescent.services.common import metrics
from crescent.services.conductor.cluster import InstanceInfo, InstanceState, Load, Role, Tier
from crescent.services.conductor.kv_index import KvEventKind, KvIndex
from crescent.services.conductor.redis_state import RedisKvIndex, RedisRegistry
from crescent.services.conductor.registry import Registry

log = logging.getLogger("crescent.conductor")
T = TypeVar("T")
_DOWN = object()  # what a Redis call returns while the link is down


class RedisLink:
    """Whether Redis answers, with a bounded probe rate while it does not, and a resync when it comes back."""

    def __init__(self, client: redis.Redis, ns: str, retry_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.client = client
        self.marker = f"{ns}:synced"
        self.retry_s = retry_s
        self.clock = clock
        self.up = True
        metrics.CONDUCTOR_REDIS_UP.set(1)
        self.resyncs = 0
        self._next_probe = 0.0
        self._next_marker_check = 0.0
        self._resync: Callable[[], None] = lambda: None
        self._lock = threading.Lock()

    def on_resync(self, fn: Callable[[], None]) -> None:
        self._resync = fn

    def call(self, fn: Callable[..., T], *args, **kwargs) -> T | object:
        """``fn(*args)`` against Redis, or ``_DOWN`` (without calling it) while Redis does not answer."""
        if not self.up and not self._try_recover():
            return _DOWN
        try:
            return fn(*args, **kwargs)
        except redis.RedisError as exc:
            self._mark_down(exc)
            return _DOWN

    def check_marker(self) -> None:
        """Resync when Redis lost its data without this replica seeing an error (a fast restart); at most every
        ``retry_s``, so reads do not pay a round trip each."""
        now = self.clock()
        if not self.up or now < self._next_marker_check:
            return
        self._next_marker_check = now + self.retry_s
        if self.call(self.client.exists, self.marker) == 0:
            log.warning("redis lost the cluster state (no %s key): writing this replica's state back", self.marker)
            self._run_resync()

    def _mark_down(self, exc: Exception) -> None:
        with self._lock:
            if self.up:
                log.warning("redis unreachable (%s): serving from this replica's own state, retrying every %.1fs",
                            exc, self.retry_s)
            self.up = False
            metrics.CONDUCTOR_REDIS_UP.set(0)
            self._next_probe = self.clock() + self.retry_s

    def _try_recover(self) -> bool:
        with self._lock:
            if self.clock() < self._next_probe:
                return False
            self._next_probe = self.clock() + self.retry_s
        try:
            self.client.ping()
        except redis.RedisError:
            return False
        self.up = True
        metrics.CONDUCTOR_REDIS_UP.set(1)
        self._run_resync()
        if self.up:
            log.warning("redis reachable again: state written back, reading from redis")
        return self.up

    def _run_resync(self) -> None:
        try:
            self._resync()
            self.client.set(self.marker, "1")
            self.resyncs += 1
            metrics.CONDUCTOR_REDIS_RESYNCS.inc()
        except redis.RedisError as exc:
            self._mark_down(exc)


class MirroredRegistry:
    """The registry's methods over Redis, with a local copy that serves while Redis is down."""

    def __init__(self, remote: RedisRegistry, link: RedisLink) -> None:
        self.remote, self.link = remote, link
        self.local = Registry(remote.heartbeat_timeout_s)
        self.heartbeat_timeout_s = remote.heartbeat_timeout_s

    def register(self, info: InstanceInfo, load: Load, now: float) -> None:
        # Redis decides takeovers while it answers (other replicas' instances are there); InstanceIdTaken passes up
        if self.link.call(self.remote.register, info, load, now) is _DOWN:
            self.local.register(info, load, now)
        else:
            self.local.put(InstanceState(info=info, load=load, last_heartbeat=now))

    def heartbeat(self, instance_id: str, load: Load, now: float) -> bool:
        known = self.link.call(self.remote.heartbeat, instance_id, load, now)
        local_known = self.local.heartbeat(instance_id, load, now)
        if known is _DOWN:
            return local_known
        if known and not local_known:  # registered through another replica: learn it
            state = self.link.call(self.remote.get, instance_id)
            if isinstance(state, InstanceState):
                self.local.put(state)
        return bool(known)

    def deregister(self, instance_id: str) -> bool:
        known = self.link.call(self.remote.deregister, instance_id)
        local_known = self.local.deregister(instance_id)
        return local_known if known is _DOWN else bool(known)

    def expire(self, now: float) -> list[InstanceInfo]:
        dropped = self.local.expire(now)
        remote = self.link.call(self.remote.expire, now)
        if remote is _DOWN:
            return dropped
        # Redis's HDEL decides which replica reports a drop: report those, and forget the rest quietly
        return list(remote)  # type: ignore[arg-type]

    def get(self, instance_id: str) -> InstanceState | None:
        state = self.link.call(self.remote.get, instance_id)
        return self.local.get(instance_id) if state is _DOWN else state  # type: ignore[return-value]

    def instances(self, role: Role | None = None) -> list[InstanceState]:
        self.link.check_marker()
        states = self.link.call(self.remote.instances)
        if states is _DOWN:
            return self.local.instances(role)
        self.local.replace_all(states)  # type: ignore[arg-type]
        return [s for s in states if role is None or s.info.role == role]  # type: ignore[union-attr]

    def write_back(self) -> None:
        """Put every locally known instance into Redis (a resync); newer heartbeats in Redis win."""
        for state in self.local.instances():
            current = self.remote.get(state.instance_id)
            if current is None or current.last_heartbeat < state.last_heartbeat:
                self.remote.put(state)


class MirroredKvIndex:
    """The KV index's methods over Redis, with a local copy of what this replica was told."""

    def __init__(self, remote: RedisKvIndex, link: RedisLink) -> None:
        self.remote, self.link = remote, link
        self.local = KvIndex()

    def apply(self, instance_id: str, kind: KvEventKind, hashes: Sequence[int], tier: Tier,
              from_tier: Tier | None = None) -> None:
        self.local.apply(instance_id, kind, hashes, tier, from_tier)
        self.link.call(self.remote.apply, instance_id, kind, hashes, tier, from_tier)

    def prefix_tiers(self, instance_id: str, hashes: Sequence[int]) -> list[Tier]:
        tiers = self.link.call(self.remote.prefix_tiers, instance_id, hashes)
        return self.local.prefix_tiers(instance_id, hashes) if tiers is _DOWN else tiers  # type: ignore[return-value]

    def longest_prefix(self, instance_id: str, hashes: Sequence[int]) -> int:
        return len(self.prefix_tiers(instance_id, hashes))

    def drop_instance(self, instance_id: str) -> None:
        self.local.drop_instance(instance_id)
        self.link.call(self.remote.drop_instance, instance_id)

    def count_by_tier(self) -> dict[Tier, int]:
        counts = self.link.call(self.remote.count_by_tier)
        return self.local.count_by_tier() if counts is _DOWN else counts  # type: ignore[return-value]

    def write_back(self) -> None:
        for instance_id, blocks in self.local.snapshot().items():
            by_tier: dict[Tier, list[int]] = {}
            for h, tier in blocks.items():
                by_tier.setdefault(tier, []).append(h)
            for tier, hashes in by_tier.items():
                self.remote.apply(instance_id, KvEventKind.STORED, hashes, tier)


def mirrored_state(client: redis.Redis, heartbeat_timeout_s: float, ns: str,
                   retry_s: float = 1.0) -> tuple[MirroredRegistry, MirroredKvIndex, RedisLink]:
    link = RedisLink(client, ns, retry_s)
    registry = MirroredRegistry(RedisRegistry(client, heartbeat_timeout_s, ns), link)
    index = MirroredKvIndex(RedisKvIndex(client, ns), link)

    def resync() -> None:
        registry.write_back()
        index.write_back()

    link.on_resync(resync)
    return registry, index, link
