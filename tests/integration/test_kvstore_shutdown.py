"""Graceful shutdown of the kvstore as a real process: SIGTERM flushes DRAM-only blocks to the SSD tier and a
restarted process serves them."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from crescent.proto.v1 import common_pb2, kvstore_pb2, kvstore_pb2_grpc
from crescent.services.kvstore.client import KvStoreClient

BLOCK = 8192
LAYERS = (0, 4)


def block(seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, BLOCK, dtype=np.uint8).tobytes()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(data_dir, grpc_port: int, data_port: int) -> subprocess.Popen:
    env = {**os.environ, "CRESCENT_DATA_DIR": str(data_dir), "CRESCENT_METRICS_PORT": "0"}
    args = ["--port", str(grpc_port), "--data-port", str(data_port), "--dram-capacity-bytes", str(16 * BLOCK),
            "--ssd-capacity-bytes", str(64 * BLOCK), "--block-bytes", str(BLOCK), "--no-ssd-fsync",
            "--shutdown-flush-timeout-s", "20"]
    proc = subprocess.Popen([sys.executable, "-m", "crescent.cli", "serve", "kvstore", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    address = f"127.0.0.1:{grpc_port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with grpc.insecure_channel(address) as ch:
                status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1).status
            if status == health_pb2.HealthCheckResponse.SERVING:
                return proc
        except grpc.RpcError:
            time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"kvstore did not become ready: {proc.communicate(timeout=10)[1][-2000:]}")


def stop(proc: subprocess.Popen) -> str:
    proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert proc.returncode == 0, err[-2000:]
    return err


def lookup_tiers(grpc_port: int, hashes: list[int]) -> list[int]:
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as ch:
        reply = kvstore_pb2_grpc.KvStoreStub(ch).Lookup(
            kvstore_pb2.LookupRequest(model_id="m", block_hashes=hashes, layer_start=0, layer_end=4), timeout=2)
    return list(reply.tiers)


def test_sigterm_flushes_dram_blocks_and_a_restart_serves_them(tmp_path):
    grpc_port, data_port = free_port(), free_port()
    hashes = list(range(1, 11))
    proc = start(tmp_path / "ssd", grpc_port, data_port)
    try:
        with KvStoreClient.connect(f"127.0.0.1:{data_port}") as client:
            assert client.put_blocks("m", hashes, [block(h) for h in hashes], LAYERS) == 10
        assert lookup_tiers(grpc_port, hashes) == [common_pb2.TIER_DRAM] * 10  # DRAM only: nothing on disk
        log = stop(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "shutdown flush: 10 written, 0 already on SSD" in log, log[-2000:]
    proc = start(tmp_path / "ssd", grpc_port, data_port)
    try:
        assert lookup_tiers(grpc_port, hashes) == [common_pb2.TIER_SSD] * 10
        with KvStoreClient.connect(f"127.0.0.1:{data_port}") as client:
            got = client.get_blocks("m", hashes, LAYERS)
        assert [bytes(g) if g is not None else None for g in got] == [block(h) for h in hashes]
        # served blocks were promoted (DRAM copy, SSD copy kept): a second shutdown rewrites nothing
        log = stop(proc)
        assert "shutdown flush: 0 written, 10 already on SSD" in log, log[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
