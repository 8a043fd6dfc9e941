"""Registry and KV index kept in Redis, so several conductor replicas share one view of the cluster.

Layout (``ns`` = key namespace): ``{ns}:instances`` hash instance_id -> JSON {info, load, last_heartbeat};
``{ns}:kv:{instance_id}`` hash block hash -> tier. Heartbeat times are wall-clock seconds (replicas compare them).
Reservations and the ledger stay per replica: each replica counts what it placed itself.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict

import redis

from crescent.services.conductor.cluster import InstanceInfo, InstanceState, Load, Role, Tier
from crescent.services.conductor.kv_index import KvEventKind
from crescent.services.conductor.registry import InstanceIdTaken, takeover_refusal

# Conditional updates run server-side so two replicas applying events never interleave mid-update.
_EVICT = """
for i, h in ipairs(ARGV) do
  if i > 1 and redis.call('HGET', KEYS[1], h) == ARGV[1] then redis.call('HDEL', KEYS[1], h) end
end
return 0
"""
# Register, unless a live instance at another address holds the id (then the holder's state comes back, and
# Python says why): one script, so two replicas cannot both pass the check and overwrite each other.
_REGISTER = """
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if raw then
  local old = cjson.decode(raw)
  if old.info.address ~= ARGV[2] and tonumber(ARGV[3]) - old.last_heartbeat <= tonumber(ARGV[4]) then
    return raw
  end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[5])
return false
"""
_MOVE = """
for i, h in ipairs(ARGV) do
  if i > 2 then
    local cur = redis.call('HGET', KEYS[1], h)
    if cur == false or cur == ARGV[1] then redis.call('HSET', KEYS[1], h, ARGV[2]) end
  end
end
return 0
"""


def connect(url: str, password: str = "", tls: bool = False, ca_file: str = "", cert_file: str = "",
            key_file: str = "", timeout_s: float = 2.0) -> redis.Redis:
    """A client for ``url`` with an optional password and TLS (server verified against ``ca_file``, or the system's
    CAs; a client certificate when the server asks for one). Nothing is sent until the first command."""
    kwargs: dict = {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s}
    if password:
        kwargs["password"] = password
    if tls or url.startswith("rediss://"):
        kwargs.update(ssl_cert_reqs="required", ssl_ca_certs=ca_file or None,
                      ssl_certfile=cert_file or None, ssl_keyfile=key_file or None)
        url = "rediss://" + url.split("://", 1)[1]
    return redis.Redis.from_url(url, **kwargs)


def _state_to_json(state: InstanceState) -> str:
    info = asdict(state.info)
    info["role"] = int(state.info.role)
    return json.dumps({"info": info, "load": asdict(state.load), "last_heartbeat": state.last_heartbeat})


def _state_from_json(raw: bytes | str) -> InstanceState:
    data = json.loads(raw)
    info = dict(data["info"])
    info["role"] = Role(info["role"])
    return InstanceState(info=InstanceInfo(**info), load=Load(**data["load"]), last_heartbeat=data["last_heartbeat"])


class RedisRegistry:
    def __init__(self, client: redis.Redis, heartbeat_timeout_s: float = 3.0, ns: str = "crescent") -> None:
        if heartbeat_timeout_s <= 0:
            raise ValueError(f"heartbeat_timeout_s must be positive, got {heartbeat_timeout_s}")
        self.r = client
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.key = f"{ns}:instances"
        self._register = client.register_script(_REGISTER)

    def register(self, info: InstanceInfo, load: Load, now: float) -> None:
        """Add or refresh an instance; InstanceIdTaken when a live one at another address holds its id."""
        if not info.instance_id:
            raise ValueError("instance_id must be non-empty")
        state = _state_to_json(InstanceState(info, load, last_heartbeat=now))
        holder = self._register(keys=[self.key], args=[info.instance_id, info.address, repr(now),
                                                       repr(self.heartbeat_timeout_s), state])
        if holder is not None:  # the script refused; say why
            old = _state_from_json(holder)
            raise InstanceIdTaken(takeover_refusal(old, info, now, self.heartbeat_timeout_s)
                                  or f"instance id {info.instance_id!r} is held by a live instance at {old.info.address}")

    def put(self, state: InstanceState) -> None:
        """Write an instance's state as is (a replica's write-back after Redis lost it)."""
        self.r.hset(self.key, state.instance_id, _state_to_json(state))

    def heartbeat(self, instance_id: str, load: Load, now: float) -> bool:
        raw = self.r.hget(self.key, instance_id)
        if raw is None:
            return False
        state = _state_from_json(raw)
        state.load, state.last_heartbeat = load, now
        self.r.hset(self.key, instance_id, _state_to_json(state))
        return True

    def deregister(self, instance_id: str) -> bool:
        return bool(self.r.hdel(self.key, instance_id))

    def expire(self, now: float) -> list[InstanceInfo]:
        dropped = []
        for raw in self.r.hvals(self.key):
            state = _state_from_json(raw)
            # HDEL's count tells which replica actually dropped it, so the drop is counted once.
            if now - state.last_heartbeat > self.heartbeat_timeout_s and self.r.hdel(self.key, state.instance_id):
                dropped.append(state.info)
        return dropped

    def get(self, instance_id: str) -> InstanceState | None:
        raw = self.r.hget(self.key, instance_id)
        return _state_from_json(raw) if raw is not None else None

    def instances(self, role: Role | None = None) -> list[InstanceState]:
        states = [_state_from_json(raw) for raw in self.r.hvals(self.key)]
        return sorted((s for s in states if role is None or s.info.role == role), key=lambda s: s.instance_id)


class RedisKvIndex:
    def __init__(self, client: redis.Redis, ns: str = "crescent") -> None:
        self.r = client
        self.ns = ns
        self._evict = client.register_script(_EVICT)
        self._move = client.register_script(_MOVE)

    def _key(self, instance_id: str) -> str:
        return f"{self.ns}:kv:{instance_id}"

    def apply(self, instance_id: str, kind: KvEventKind, hashes: Sequence[int], tier: Tier,
              from_tier: Tier | None = None) -> None:
        if not hashes:
            return
        key, fields = self._key(instance_id), [str(h) for h in hashes]
        if kind == KvEventKind.STORED:
            self.r.hset(key, mapping=dict.fromkeys(fields, int(tier)))
        elif kind == KvEventKind.EVICTED:
            self._evict(keys=[key], args=[int(tier), *fields])
        elif kind == KvEventKind.MOVED:
            source = int(from_tier) if from_tier is not None else int(tier)
            self._move(keys=[key], args=[source, int(tier), *fields])
        else:
            raise ValueError(f"unknown KV event kind {kind!r}")

    def prefix_tiers(self, instance_id: str, hashes: Sequence[int]) -> list[Tier]:
        if not hashes:
            return []
        out: list[Tier] = []
        for raw in self.r.hmget(self._key(instance_id), [str(h) for h in hashes]):
            if raw is None:
                break
            out.append(Tier(int(raw)))
        return out

    def longest_prefix(self, instance_id: str, hashes: Sequence[int]) -> int:
        return len(self.prefix_tiers(instance_id, hashes))

    def drop_instance(self, instance_id: str) -> None:
        self.r.delete(self._key(instance_id))

    def count_by_tier(self) -> dict[Tier, int]:
        counts = {t: 0 for t in Tier}
        for key in self.r.scan_iter(match=f"{self.ns}:kv:*", count=100):
            for raw in self.r.hvals(key):
                counts[Tier(int(raw))] += 1
        return counts
