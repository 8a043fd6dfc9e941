"""The mooncake transport (Transfer Engine, TCP mode on loopback), draining, and the service as a real
process."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from crescent.proto.v1 import kvstore_pb2, kvstore_pb2_grpc
from crescent.services.kvstore import wire as p
from crescent.services.kvstore.client import KvStoreClient
from crescent.services.kvstore.server import run_in_thread
from crescent.services.kvstore.settings import KvStoreSettings

pytest.importorskip("mooncake.engine")

BLOCK = 8192
LAYERS = (0, 4)


def block(seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, BLOCK, dtype=np.uint8).tobytes()


@pytest.fixture
def mc_store(tmp_path):
    handle = run_in_thread(KvStoreSettings(
        port=0, data_port=0, metrics_port=0, transport="mooncake", dram_capacity_bytes=32 * BLOCK,
        ssd_capacity_bytes=256 * BLOCK, data_dir=str(tmp_path / "ssd"), ssd_fsync=False, drain_timeout_s=1.5))
    yield handle
    handle.stop()


def health(address: str) -> int:
    with grpc.insecure_channel(address) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2).status


def test_mooncake_put_get_with_metadata_and_promotion(mc_store):
    with KvStoreClient.connect(mc_store.data_address, transport="mooncake", verify_checksums=True) as client:
        # 80 blocks through a 32-slot arena: demotions, then promotions on read
        hashes = list(range(100, 180))
        for start in range(0, 80, 8):
            chunk = hashes[start : start + 8]
            assert client.put_blocks("m", chunk, [block(h) for h in chunk], LAYERS,
                                     metas=[h.to_bytes(2, "little") for h in chunk]) == 8
        got = client.get_blocks_with_meta("m", hashes[:8] + [999], LAYERS)
        assert got[-1] is None
        assert all(bytes(g.data) == block(h) and g.meta == h.to_bytes(2, "little")
                   for h, g in zip(hashes[:8], got, strict=False))
        out = memoryview(bytearray(16 * BLOCK))
        views = client.get_prefix("m", hashes[30:34], LAYERS, out=out)
        assert [bytes(v) for v in views] == [block(h) for h in hashes[30:34]]
        assert client.lookup_prefix("m", hashes, LAYERS) == 80


def test_mooncake_concurrent_clients(mc_store):
    errors: list[str] = []

    def worker(w: int) -> None:
        hashes = [w * 100 + i for i in range(6)]
        with KvStoreClient.connect(mc_store.data_address, transport="mooncake") as client:
            if client.put_blocks("m", hashes, [block(h) for h in hashes], LAYERS) != 6:
                errors.append(f"{w}: put")
            for h, data in zip(hashes, client.get_blocks("m", hashes, LAYERS), strict=True):
                if data is None or bytes(data) != block(h):
                    errors.append(f"{w}:{h}")

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads) and errors == []


def test_drain_reports_not_serving_while_a_lease_is_held(mc_store):
    with KvStoreClient.connect(mc_store.data_address, transport="mooncake") as client:
        client.put_blocks("m", [1], [block(1)], LAYERS)
    # a raw MC_GET pins block 1 and holds the lease (no MC_RELEASE): stop() must wait for it, not serving
    host, port = mc_store.data_address.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=5)
    body = p.BlockRequest("m", *LAYERS, np.array([1], np.uint64)).encode()
    sock.sendall(p.pack_header(p.Op.MC_GET, 1, len(body), 0) + body)
    head = p.recv_exact(sock, p.HEADER.size)
    assert p.unpack_header(head)[1] == p.Status.OK
    stopper = threading.Thread(target=mc_store.stop)
    stopper.start()
    time.sleep(0.4)
    assert stopper.is_alive() and health(mc_store.grpc_address) == health_pb2.HealthCheckResponse.NOT_SERVING
    stopper.join(timeout=10)
    assert not stopper.is_alive()
    sock.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_service_process_serves_and_drains_on_sigterm(tmp_path):
    grpc_port, data_port = free_port(), free_port()
    env = {**os.environ, "CRESCENT_DATA_DIR": str(tmp_path / "ssd"), "CRESCENT_METRICS_PORT": "0"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "crescent.cli",
            "serve",
            "kvstore",
            "--port",
            str(grpc_port),
            "--data-port",
            str(data_port),
            "--dram-capacity-bytes",
            str(1 << 20),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        address = f"127.0.0.1:{grpc_port}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if health(address) == health_pb2.HealthCheckResponse.SERVING:
                    break
            except grpc.RpcError:
                time.sleep(0.1)
        with KvStoreClient.connect(f"127.0.0.1:{data_port}") as client:
            assert client.put_blocks("m", [1], [block(1)], LAYERS) == 1
        with grpc.insecure_channel(address) as ch:
            stats = kvstore_pb2_grpc.KvStoreStub(ch).Stats(kvstore_pb2.StatsRequest(), timeout=2)
        assert stats.blocks_dram == 1 and stats.data_address == f"127.0.0.1:{data_port}"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_mooncake_control_connection_needs_the_internal_token(tmp_path):
    from crescent.services.kvstore.transport import ServerError

    handle = run_in_thread(KvStoreSettings(
        port=0, data_port=0, metrics_port=0, transport="mooncake", dram_capacity_bytes=8 * BLOCK,
        ssd_capacity_bytes=0, data_dir=str(tmp_path / "ssd"), internal_token="mc-token"))
    try:
        with pytest.raises(ServerError, match="needs the internal token"):  # no session info, no arena addresses
            KvStoreClient.connect(handle.data_address, transport="mooncake")
        with KvStoreClient.connect(handle.data_address, transport="mooncake", token="mc-token") as client:
            assert client.put_blocks("m", [1], [block(1)], LAYERS) == 1
            assert bytes(client.get_blocks("m", [1], LAYERS)[0]) == block(1)
    finally:
        handle.stop()
