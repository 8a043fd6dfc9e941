from __future__ import annotations

import pytest

from crescent.services.conductor.cluster import FakeClock, InstanceInfo, Load, Role
from crescent.services.conductor.registry import Registry


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
