from __future__ import annotations

import pytest

from crescent.services.conductor.cluster import FakeClock, InstanceInfo, Load, Role
from crescent.services.conductor.registry import InstanceIdTaken, Registry


def test_heartbeats_keep_an_instance_and_silence_drops_it():
    clock, reg = FakeClock(), Registry(heartbeat_timeout_s=3.0)
    reg.register(InstanceInfo("p0", Role.PREFILL), Load(), clock.now())
    reg.register(InstanceInfo("d0", Role.DECODE), Load(), clock.now())
    for _ in range(5):  # p0 keeps beating, d0 is silent
        clock.advance(1.0)
        assert reg.heartbeat("p0", Load(waiting=2), clock.now())
        dropped = reg.expire(clock.now())
        if clock.now() <= 3.0:
            assert dropped == []
    assert [s.instance_id for s in reg.instances()] == ["p0"]
    assert reg.get("p0").load.waiting == 2
    assert reg.instances(Role.DECODE) == []


def test_expire_reports_the_dropped_instance_once():
    clock, reg = FakeClock(), Registry(heartbeat_timeout_s=1.0)
    reg.register(InstanceInfo("d0", Role.DECODE), Load(), 0.0)
    clock.advance(1.5)
    assert [i.instance_id for i in reg.expire(clock.now())] == ["d0"]
    assert reg.expire(clock.now()) == []
    assert not reg.heartbeat("d0", Load(), clock.now())  # dropped: must register again


def test_deregister_and_bad_input():
    reg = Registry()
    reg.register(InstanceInfo("k0", Role.KVSTORE), Load(), 0.0)
    assert reg.deregister("k0") and not reg.deregister("k0")
    with pytest.raises(ValueError, match="instance_id"):
        reg.register(InstanceInfo("", Role.PREFILL), Load(), 0.0)
    with pytest.raises(ValueError, match="positive"):
        Registry(heartbeat_timeout_s=0)


def test_instances_are_copies():
    reg = Registry()
    reg.register(InstanceInfo("p0", Role.PREFILL), Load(waiting=1), 0.0)
    reg.instances()[0].load.waiting = 99
    assert reg.get("p0").load.waiting == 1


def test_a_live_instance_id_cannot_be_taken_from_another_address():
    reg = Registry(heartbeat_timeout_s=3.0)
    reg.register(InstanceInfo("p0", Role.PREFILL, address="10.0.0.1:1"), Load(), 0.0)
    with pytest.raises(InstanceIdTaken, match="held by a live instance at 10.0.0.1:1"):
        reg.register(InstanceInfo("p0", Role.PREFILL, address="10.0.0.2:1"), Load(), 3.0)
    reg.register(InstanceInfo("p0", Role.PREFILL, address="10.0.0.1:1"), Load(waiting=2), 3.0)  # itself, restarted
    assert reg.get("p0").load.waiting == 2
    reg.register(InstanceInfo("p0", Role.PREFILL, address="10.0.0.2:1"), Load(), 6.5)  # silent > 3 s: dead
    assert reg.get("p0").info.address == "10.0.0.2:1"
    reg.deregister("p0")
    reg.register(InstanceInfo("p0", Role.PREFILL, address="10.0.0.3:1"), Load(), 6.6)  # freed
    assert reg.get("p0").info.address == "10.0.0.3:1"
