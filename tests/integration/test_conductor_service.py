"""The conductor's gRPC service on a free port, driven by a real gRPC client."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from crescent.hashing import prefix_block_hashes
from crescent.proto.v1 import common_pb2, conductor_pb2
from crescent.services.conductor.server import run_in_thread
from crescent.services.conductor.settings import ConductorSettings

from .conductor_client import register, stub, wait_until

PREFILL, DECODE, KVSTORE = common_pb2.ROLE_PREFILL, common_pb2.ROLE_DECODE, common_pb2.ROLE_KVSTORE


@pytest.fixture
def conductor():
    settings = ConductorSettings(port=0, metrics_port=0, policy="cache_aware", rejection="load",
                                 heartbeat_interval_s=0.1, heartbeat_timeout_s=0.5)
    running = run_in_thread(settings)
    channel, client = stub(running.address)
    yield running, client, channel
    channel.close()
    running.stop()


def _place(client, rid: str, tokens: list[int], max_tokens: int = 16) -> conductor_pb2.PlaceResponse:
    req = conductor_pb2.PlaceRequest(request_id=rid, model_id="m", prompt_tokens=len(tokens), max_tokens=max_tokens,
                                     block_hashes=prefix_block_hashes(tokens, 16, "m"))
    return client.Place(req, timeout=5)


def test_register_place_by_cache_finish_and_drop(conductor):
    running, client, channel = conductor
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    reply = register(client, "p0", PREFILL)
    assert reply.heartbeat_timeout_s == 0.5
    register(client, "p1", PREFILL)
    register(client, "d0", DECODE, free_kv_blocks=100, total_kv_blocks=100)
    register(client, "s0", KVSTORE)

    tokens = list(range(100))  # 6 full blocks
    hashes = prefix_block_hashes(tokens, 16, "m")
    event = conductor_pb2.KvEvent(kind=conductor_pb2.KvEvent.KIND_STORED, block_hashes=hashes,
                                  tier=common_pb2.TIER_DEVICE)
    client.ReportKvEvents(conductor_pb2.KvEventBatch(instance_id="p1", model_id="m", events=[event]), timeout=5)

    placed = _place(client, "r1", tokens)
    assert placed.accepted and placed.policy == "cache_aware"
    assert (placed.prefill.instance_id, placed.decode.instance_id, placed.kvstore.instance_id) == ("p1", "d0", "s0")
    assert placed.cached_prefix_blocks == 6 and placed.predicted_ttft_s > 0
    client.Finish(conductor_pb2.FinishRequest(request_id="r1", completion_tokens=5, ok=True), timeout=5)

    listed = client.ListInstances(conductor_pb2.ListInstancesRequest(), timeout=5)
    assert sorted(s.instance.instance_id for s in listed.instances) == ["d0", "p0", "p1", "s0"]

    # Only p0 keeps beating: everything else is dropped after the 0.5 s timeout.
    def only_p0_left() -> bool:
        assert client.Heartbeat(conductor_pb2.HeartbeatRequest(instance_id="p0"), timeout=5).known
        ids = [s.instance.instance_id for s in client.ListInstances(conductor_pb2.ListInstancesRequest(),
                                                                    timeout=5).instances]
        return ids == ["p0"]

    wait_until(only_p0_left, timeout_s=5.0, what="silent instances to be dropped")
    assert not client.Heartbeat(conductor_pb2.HeartbeatRequest(instance_id="d0"), timeout=5).known
    # no decode instance is live: the prefill worker stands in for it (every worker serves both services)
    stand_in = _place(client, "r2", tokens)
    assert stand_in.accepted and (stand_in.prefill.instance_id, stand_in.decode.instance_id) == ("p0", "p0")
    client.Deregister(conductor_pb2.DeregisterRequest(instance_id="p0"), timeout=5)
    refused = _place(client, "r3", tokens)
    assert not refused.accepted and refused.reject_reason == "no_instance" and refused.retry_after_s > 0


def test_bad_input_is_invalid_argument_and_the_service_keeps_serving(conductor):
    _, client, _ = conductor
    with pytest.raises(grpc.RpcError) as err:
        register(client, "", PREFILL)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:
        register(client, "x", common_pb2.ROLE_UNSPECIFIED)
    assert "role" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        client.Place(conductor_pb2.PlaceRequest(request_id="r", prompt_tokens=0), timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    bad_event = conductor_pb2.KvEvent(kind=conductor_pb2.KvEvent.KIND_MOVED, block_hashes=[1],
                                      tier=common_pb2.TIER_SSD)
    with pytest.raises(grpc.RpcError, match="from_tier"):
        client.ReportKvEvents(conductor_pb2.KvEventBatch(instance_id="s", events=[bad_event]), timeout=5)
    register(client, "p0", PREFILL)
    register(client, "d0", DECODE)
    assert _place(client, "ok", list(range(40))).accepted


def test_a_dead_instance_is_dropped_by_its_channel_a_busy_one_is_kept():
    """Silent past suspect_after_s: an address that refuses connections (the process is gone) is dropped at once, long
    before the heartbeat timeout; one whose server still answers (busy, not dead) stays registered."""
    import time

    from crescent.services.common.launcher import free_port

    settings = ConductorSettings(port=0, metrics_port=0, heartbeat_interval_s=0.2, heartbeat_timeout_s=30.0,
                                 suspect_after_s=0.5)
    running = run_in_thread(settings)
    channel, client = stub(running.address)
    try:
        def info(iid: str, address: str) -> conductor_pb2.InstanceInfo:
            return conductor_pb2.InstanceInfo(instance_id=iid, role=DECODE, address=address, model_id="m",
                                              kv_block_size=16)

        dead, busy = f"127.0.0.1:{free_port()}", running.address  # the conductor's own server answers health
        for iid, address in (("gone", dead), ("busy", busy)):
            client.Register(conductor_pb2.RegisterRequest(instance=info(iid, address), load=common_pb2.Load()),
                            timeout=5)
        started = time.monotonic()

        def listed() -> list[str]:
            return sorted(s.instance.instance_id for s in
                          client.ListInstances(conductor_pb2.ListInstancesRequest(), timeout=5).instances)

        wait_until(lambda: listed() == ["busy"], timeout_s=10.0, what="the dead instance to be dropped")
        assert time.monotonic() - started < 10.0  # far below the 30 s heartbeat timeout
        time.sleep(1.0)
        assert listed() == ["busy"]  # silent too, but its channel answers: kept (it just gets no new work)
    finally:
        channel.close()
        running.stop()
