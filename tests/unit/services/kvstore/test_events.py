"""ConductorReporter against a real gRPC server that records what a conductor would receive."""

from __future__ import annotations

import threading
import time
from concurrent import futures

import grpc
import pytest

from crescent.proto.v1 import common_pb2, conductor_pb2, conductor_pb2_grpc
from crescent.services.kvstore.blocks import EventKind, KvEvent, Tier
from crescent.services.kvstore.events import ConductorReporter, coalesce


class RecordingConductor(conductor_pb2_grpc.ConductorServicer):
    """Fails the first ``fail_first`` calls with UNAVAILABLE, then records everything."""

    def __init__(self, fail_first: int = 0):
        self.fail_left = fail_first
        self.registers, self.heartbeats, self.batches = [], [], []
        self.lock = threading.Lock()

    def _maybe_fail(self, context):
        with self.lock:
            if self.fail_left > 0:
                self.fail_left -= 1
                context.abort(grpc.StatusCode.UNAVAILABLE, "not yet")

    def Register(self, request, context):
        self._maybe_fail(context)
        self.registers.append(request)
        return conductor_pb2.RegisterResponse(heartbeat_interval_s=0.05, heartbeat_timeout_s=1)

    def Heartbeat(self, request, context):
        self.heartbeats.append(request)
        return conductor_pb2.HeartbeatResponse(known=len(self.heartbeats) != 2)  # once: "register again"

    def ReportKvEvents(self, request, context):
        self.batches.append(request)
        return conductor_pb2.Ack()

    def Deregister(self, request, context):
        return conductor_pb2.Ack()


@pytest.fixture
def conductor():
    servicer = RecordingConductor(fail_first=2)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    conductor_pb2_grpc.add_ConductorServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(0)


def wait_for(cond, timeout_s=5.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return False


def test_coalesce_merges_runs_per_model():
    events = [
        KvEvent(EventKind.STORED, "a", [1], Tier.DRAM),
        KvEvent(EventKind.STORED, "a", [2], Tier.DRAM),
        KvEvent(EventKind.MOVED, "a", [1], Tier.SSD, Tier.DRAM),
        KvEvent(EventKind.STORED, "b", [3], Tier.DRAM),
    ]
    out = coalesce(events)
    assert [list(e.block_hashes) for e in out["a"]] == [[1, 2], [1]]
    assert out["a"][1].from_tier == common_pb2.TIER_DRAM and list(out["b"][0].block_hashes) == [3]


def test_reporter_registers_heartbeats_and_batches_events(conductor):
    servicer, address = conductor
    info = conductor_pb2.InstanceInfo(instance_id="kv-1", role=common_pb2.ROLE_KVSTORE, transport="tcp")
    load = common_pb2.Load(store_bytes_used=10, store_bytes_capacity=100)
    reporter = ConductorReporter(
        address, info, lambda: load, heartbeat_interval_s=0.05, rpc_timeout_s=1, max_backoff_s=0.2
    )
    for h in range(5):
        reporter.sink(KvEvent(EventKind.STORED, "m", [h], Tier.DRAM))
    reporter.start()
    try:
        # two refused registrations, then one; the conductor's "unknown" heartbeat makes it register again
        assert wait_for(lambda: len(servicer.registers) >= 2 and servicer.batches)
        assert servicer.registers[0].instance.role == common_pb2.ROLE_KVSTORE
        assert servicer.heartbeats[0].load.store_bytes_capacity == 100
        batch = servicer.batches[0]
        assert batch.model_id == "m" and list(batch.events[0].block_hashes) == [0, 1, 2, 3, 4]
        reporter.sink(KvEvent(EventKind.EVICTED, "m", [7], Tier.SSD))
        assert wait_for(
            lambda: any(
                e.kind == conductor_pb2.KvEvent.KIND_EVICTED for b in servicer.batches for e in b.events
            )
        )
    finally:
        reporter.stop()


def test_reporter_never_blocks_when_conductor_is_down():
    """A conductor that accepts connections and never answers: each call hangs for its whole 3 s deadline, and
    the store's event sink still takes 5,000 events in far less than one deadline (they are queued, never sent
    inline). The bound is the RPC deadline, not a speed: it holds on a loaded 2-core machine."""
    import socket

    info = conductor_pb2.InstanceInfo(instance_id="kv-2", role=common_pb2.ROLE_KVSTORE)
    with socket.socket() as blackhole:
        blackhole.bind(("127.0.0.1", 0))
        blackhole.listen(16)
        address = f"127.0.0.1:{blackhole.getsockname()[1]}"
        reporter = ConductorReporter(address, info, common_pb2.Load, rpc_timeout_s=3.0, max_backoff_s=0.2)
        reporter.start()
        started = time.monotonic()
        for h in range(5_000):
            reporter.sink(KvEvent(EventKind.STORED, "m", [h], Tier.DRAM))
        assert time.monotonic() - started < 2.0
        reporter.stop(deregister=False)


def test_service_reports_to_the_conductor(conductor, tmp_path):
    """The running service registers with its data address and reports the blocks a client stores."""
    from crescent.services.kvstore.client import KvStoreClient
    from crescent.services.kvstore.server import run_in_thread
    from crescent.services.kvstore.settings import KvStoreSettings

    servicer, address = conductor
    handle = run_in_thread(KvStoreSettings(
        port=0, data_port=0, metrics_port=0, dram_capacity_bytes=1 << 16, ssd_capacity_bytes=0,
        data_dir=str(tmp_path), conductor_address=address, instance_id="kv-test", heartbeat_interval_s=0.05))
    try:
        with KvStoreClient.connect(handle.data_address) as client:
            client.put_blocks("m", [5, 6], [b"a" * 1024, b"b" * 1024], (0, 2))
        stored = lambda: [h for b in servicer.batches for e in b.events  # noqa: E731
                          if e.kind == conductor_pb2.KvEvent.KIND_STORED for h in e.block_hashes]
        assert wait_for(lambda: stored() == [5, 6])
        info = servicer.registers[-1].instance
        assert (info.instance_id, info.transport) == ("kv-test", "tcp")
        assert info.data_address == handle.data_address
        assert servicer.heartbeats[-1].load.store_bytes_capacity == 1 << 16
    finally:
        handle.stop()
