from __future__ import annotations

import dataclasses

import pytest

from crescent.services.conductor.cluster import FakeClock, InstanceInfo, Load, Placement, Request, Role, Slo
from crescent.services.conductor.kv_index import KvIndex
from crescent.services.conductor.registry import Registry
from crescent.services.conductor.scheduler import Conductor

from .helpers import COST, request


def _conductor(policy: str = "least_loaded", rejection: str = "none") -> tuple[Conductor, FakeClock]:
    clock = FakeClock()
    reg = Registry(heartbeat_timeout_s=3.0)
    for iid, role in [("p0", Role.PREFILL), ("p1", Role.PREFILL), ("d0", Role.DECODE)]:
        reg.register(InstanceInfo(iid, role, kv_block_size=16), Load(), clock.now())
    c = Conductor(reg, KvIndex(), cost=COST, policy=policy, rejection=rejection,
                  slo=Slo(ttft_s=100, tbt_s=100, max_queue_per_instance=3))
    return c, clock


def test_a_burst_spreads_before_heartbeats_catch_up():
    c, clock = _conductor()
    picks = []
    for i in range(4):
        clock.advance(0.01)
        picks.append(c.place(request(4, rid=f"r{i}"), clock.now()).prefill.instance_id)
    assert sorted(picks) == ["p0", "p0", "p1", "p1"]
    # A later heartbeat reports the queue itself: the reservations it covers are not counted twice.
    clock.advance(0.01)
    c.registry.heartbeat("p0", Load(waiting=2, queued_prefill_tokens=130), clock.now())
    state = next(s for s in c.view(clock.now()).prefill if s.instance_id == "p0")
    assert (state.queued_requests, state.queued_prefill_tokens) == (2, 130)


def test_reservations_hit_the_queue_cap_and_finish_frees_them():
    c, clock = _conductor(policy="round_robin")
    results = [c.place(request(1, rid=f"r{i}"), clock.now()) for i in range(8)]
    assert sum(isinstance(r, Placement) for r in results) == 6  # 3 per prefill instance
    assert results[-1].reason == "queue_full"
    assert c.finish("r0", completion_tokens=10) and not c.finish("r0")
    assert isinstance(c.place(request(1, rid="again"), clock.now()), Placement)


def test_dropped_instances_get_no_new_work():
    c, clock = _conductor()
    clock.advance(2.0)
    c.registry.heartbeat("p1", Load(), clock.now())
    c.registry.heartbeat("d0", Load(), clock.now())
    clock.advance(2.0)
    assert [i.instance_id for i in c.registry.expire(clock.now())] == ["p0"]
    assert all(c.place(request(1, rid=f"r{i}"), clock.now()).prefill.instance_id == "p1" for i in range(3))


def test_bad_requests_raise_clear_errors():
    c, clock = _conductor()
    with pytest.raises(ValueError, match="prompt_tokens"):
        c.place(Request("x", 0, 1, (), 16), clock.now())
    with pytest.raises(ValueError, match="at most one hash per full block"):
        c.place(Request("x", 20, 1, (1, 2), 16), clock.now())
    with pytest.raises(ValueError, match="unknown rejection mode"):
        Conductor(Registry(), KvIndex(), rejection="sometimes")


def test_an_aggregated_worker_is_in_both_pools_and_reserved_once():
    clock = FakeClock()
    reg = Registry(heartbeat_timeout_s=3.0)
    for iid in ("w0", "w1"):
        reg.register(InstanceInfo(iid, Role.WORKER, kv_block_size=16), Load(), clock.now())
    c = Conductor(reg, KvIndex(), cost=COST, policy="least_loaded", rejection="none")
    v = c.view(clock.now())
    assert [s.instance_id for s in v.prefill] == [s.instance_id for s in v.decode] == ["w0", "w1"]
    picks = [c.place(request(4, rid=f"r{i}"), clock.now()) for i in range(4)]
    assert all(p.prefill.instance_id == p.decode.instance_id for p in picks)
    assert sorted(p.prefill.instance_id for p in picks) == ["w0", "w0", "w1", "w1"]
    w0 = next(s for s in c.view(clock.now()).prefill if s.instance_id == "w0")
    assert w0.reserved_requests == 2  # one reservation per request, though the worker holds both halves


def test_a_role_with_no_live_instance_borrows_the_other_roles_workers():
    c, clock = _conductor()
    resumed = dataclasses.replace(request(4, rid="r0"), avoid=("d0",))  # a stream leaving a dead decode
    placed = c.place(resumed, clock.now())
    assert placed.decode.instance_id in ("p0", "p1")
    c.registry.deregister("p0")
    c.registry.deregister("p1")
    placed = c.place(request(4, rid="r1"), clock.now())
    assert (placed.prefill.instance_id, placed.decode.instance_id) == ("d0", "d0")
    c.stand_in = False
    assert c.place(request(4, rid="r2"), clock.now()).reason == "no_instance"
