"""Two conductor replicas (real processes) sharing state in a real redis-server; one dies, the other serves."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from crescent.hashing import prefix_block_hashes
from crescent.proto.v1 import common_pb2, conductor_pb2

from .conductor_client import free_port, register, stub, wait_until

REDIS = shutil.which("redis-server")
pytestmark = pytest.mark.skipif(REDIS is None, reason="redis-server binary not installed (apt-get install redis-server)")
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def redis_url():
    port = free_port()
    proc = subprocess.Popen([REDIS, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port, socket_connect_timeout=0.5)
    try:
        wait_until(lambda: client.ping(), timeout_s=10.0, what="redis-server to answer PING")
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        client.close()
        proc.terminate()
        proc.wait(timeout=10)


def _start_replica(redis_url: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "crescent.cli", "serve", "conductor", "--port", str(port), "--metrics-port", "0",
           "--redis-url", redis_url, "--policy", "cache_aware", "--heartbeat-timeout-s", "1.0",
           "--log-level", "warning"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(cmd, cwd=REPO, env=env), f"127.0.0.1:{port}"


def _list(client) -> list[str]:
    return sorted(s.instance.instance_id for s in
                  client.ListInstances(conductor_pb2.ListInstancesRequest(), timeout=2).instances)


def test_two_replicas_share_state_and_survive_one_dying(redis_url):
    (proc_a, addr_a), (proc_b, addr_b) = _start_replica(redis_url), _start_replica(redis_url)
    chan_a, a = stub(addr_a)
    chan_b, b = stub(addr_b)
    try:
        for client in (a, b):
            wait_until(lambda c=client: _list(c) == [], timeout_s=20.0, what="replica to serve")
        register(a, "p0", common_pb2.ROLE_PREFILL)
        register(a, "p1", common_pb2.ROLE_PREFILL)
        register(b, "d0", common_pb2.ROLE_DECODE)
        assert _list(a) == _list(b) == ["d0", "p0", "p1"]

        tokens = list(range(64))
        hashes = prefix_block_hashes(tokens, 16, "m")
        event = conductor_pb2.KvEvent(kind=conductor_pb2.KvEvent.KIND_STORED, block_hashes=hashes,
                                      tier=common_pb2.TIER_DEVICE)
        a.ReportKvEvents(conductor_pb2.KvEventBatch(instance_id="p1", model_id="m", events=[event]), timeout=2)
        place = conductor_pb2.PlaceRequest(request_id="r1", model_id="m", prompt_tokens=70, max_tokens=8,
                                           block_hashes=hashes)
        placed = b.Place(place, timeout=2)  # replica B sees what A was told
        assert placed.accepted and placed.prefill.instance_id == "p1" and placed.cached_prefix_blocks == 4

        proc_a.kill()
        proc_a.wait(timeout=10)

        def b_serves_and_drops_silent_ones() -> bool:
            for iid in ("p1", "d0"):
                assert b.Heartbeat(conductor_pb2.HeartbeatRequest(instance_id=iid), timeout=2).known
            return _list(b) == ["d0", "p1"]  # p0 stopped beating: B drops it alone

        wait_until(b_serves_and_drops_silent_ones, timeout_s=10.0, what="replica B to drop p0")
        placed = b.Place(conductor_pb2.PlaceRequest(request_id="r2", model_id="m", prompt_tokens=70, max_tokens=8,
                                                    block_hashes=hashes), timeout=2)
        assert placed.accepted and placed.prefill.instance_id == "p1"
    finally:
        chan_a.close()
        chan_b.close()
        for proc in (proc_a, proc_b):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=10)
    assert proc_b.returncode == 0  # SIGTERM is a clean exit


def test_a_live_instance_id_cannot_be_taken_over_in_redis(redis_url):
    from crescent.services.conductor.cluster import InstanceInfo, Load, Role
    from crescent.services.conductor.redis_state import RedisRegistry
    from crescent.services.conductor.registry import InstanceIdTaken

    client = redis.Redis.from_url(redis_url)
    replica_a, replica_b = RedisRegistry(client, 3.0, "t"), RedisRegistry(client, 3.0, "t")
    replica_a.register(InstanceInfo("p0", Role.PREFILL, address="10.0.0.1:1"), Load(), 100.0)
    with pytest.raises(InstanceIdTaken, match="held by a live instance at 10.0.0.1:1"):
        replica_b.register(InstanceInfo("p0", Role.PREFILL, address="10.0.0.2:1"), Load(), 102.5)
    replica_b.register(InstanceInfo("p0", Role.PREFILL, address="10.0.0.1:1"), Load(waiting=2), 102.5)
    assert replica_a.get("p0").load.waiting == 2 and replica_a.get("p0").info.address == "10.0.0.1:1"
    replica_b.register(InstanceInfo("p0", Role.PREFILL, address="10.0.0.2:1"), Load(), 105.6)  # silent > 3 s
    assert replica_a.get("p0").info.address == "10.0.0.2:1"
    replica_a.deregister("p0")
    replica_b.register(InstanceInfo("p0", Role.PREFILL, address="10.0.0.3:1"), Load(), 105.7)
    assert replica_a.get("p0").info.address == "10.0.0.3:1"
    client.close()
