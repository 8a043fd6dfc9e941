"""The registry: which instances exist, their last reported load, and who missed too many heartbeats."""

from __future__ import annotations

import copy
import threading

from crescent.services.conductor.cluster import InstanceInfo, InstanceState, Load, Role


class InstanceIdTaken(Exception):
    """A Register would take over an id that a live instance at another address holds."""


def takeover_refusal(old: InstanceState, info: InstanceInfo, now: float, heartbeat_timeout_s: float) -> str:
    """Why a Register of ``info`` over ``old`` is refused ('' = allowed). Allowed: the same instance again (same
    address: a restarted worker) or over a dead one (no heartbeat within the timeout, even if the expiry round has
    not dropped it yet). Otherwise a second instance given the same id, or a stranger, would silently take the
    first one's traffic."""
    age = now - old.last_heartbeat
    if old.info.address == info.address or age > heartbeat_timeout_s:
        return ""
    return (f"instance id {info.instance_id!r} is held by a live instance at {old.info.address} (last heartbeat "
            f"{age:.1f}s ago); it is free once that instance deregisters or misses heartbeats for "
            f"{heartbeat_timeout_s:g}s. Give each instance its own instance_id")


class Registry:
    """In-memory registry (one conductor). ``RedisRegistry`` has the same methods for several replicas.

    Times are passed in (``now``) rather than read, so tests and the simulator drive it with a fake clock.
    """

    def __init__(self, heartbeat_timeout_s: float = 3.0) -> None:
        if heartbeat_timeout_s <= 0:
            raise ValueError(f"heartbeat_timeout_s must be positive, got {heartbeat_timeout_s}")
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self._instances: dict[str, InstanceState] = {}
        self._lock = threading.Lock()

    def register(self, info: InstanceInfo, load: Load, now: float) -> None:
        """Add or refresh an instance; InstanceIdTaken when a live one at another address holds its id."""
        if not info.instance_id:
            raise ValueError("instance_id must be non-empty")
        with self._lock:
            old = self._instances.get(info.instance_id)
            if old is not None and (why := takeover_refusal(old, info, now, self.heartbeat_timeout_s)):
                raise InstanceIdTaken(why)
            self._instances[info.instance_id] = InstanceState(info=info, load=load, last_heartbeat=now)

    def put(self, state: InstanceState) -> None:
        """Set an instance's state as is (a mirror of what Redis decided: no takeover check)."""
        with self._lock:
            self._instances[state.instance_id] = copy.deepcopy(state)

    def replace_all(self, states: list[InstanceState]) -> None:
        """Become a copy of ``states`` (the mirror of Redis after a read)."""
        with self._lock:
            self._instances = {s.instance_id: copy.deepcopy(s) for s in states}

    def heartbeat(self, instance_id: str, load: Load, now: float) -> bool:
        """Record a heartbeat; False when the instance is unknown (dropped: it must register again)."""
        with self._lock:
            state = self._instances.get(instance_id)
            if state is None:
                return False
            state.load = load
            state.last_heartbeat = now
            return True

    def deregister(self, instance_id: str) -> bool:
        with self._lock:
            return self._instances.pop(instance_id, None) is not None

    def expire(self, now: float) -> list[InstanceInfo]:
        """Drop every instance whose last heartbeat is older than the timeout; returns those dropped."""
        with self._lock:
            dead = [s.info for s in self._instances.values()
                    if now - s.last_heartbeat > self.heartbeat_timeout_s]
            for info in dead:
                del self._instances[info.instance_id]
        return dead

    def get(self, instance_id: str) -> InstanceState | None:
        with self._lock:
            state = self._instances.get(instance_id)
            return copy.deepcopy(state) if state else None

    def instances(self, role: Role | None = None) -> list[InstanceState]:
        """Copies (callers may add reservations to them), sorted by id so decisions are deterministic."""
        with self._lock:
            out = [copy.deepcopy(s) for s in self._instances.values() if role is None or s.info.role == role]
        return sorted(out, key=lambda s: s.instance_id)
