"""Small helpers for the conductor integration tests: free ports, a client, bounded waits."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

import grpc

from crescent.proto.v1 import common_pb2, conductor_pb2, conductor_pb2_grpc
from crescent.services.common.auth import sync_channel


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stub(address: str, token: str = "") -> tuple[grpc.Channel, conductor_pb2_grpc.ConductorStub]:
    """A blocking conductor client whose calls carry the internal ``token`` (none when empty)."""
    channel = sync_channel(address, token, [("grpc.enable_http_proxy", 0)])
    return channel, conductor_pb2_grpc.ConductorStub(channel)


def register(client, iid: str, role: int, block_size: int = 16, **load) -> conductor_pb2.RegisterResponse:
    info = conductor_pb2.InstanceInfo(instance_id=iid, role=role, address=f"127.0.0.1:{iid}", model_id="m",
                                      kv_block_size=block_size)
    return client.Register(conductor_pb2.RegisterRequest(instance=info, load=common_pb2.Load(**load)), timeout=5)


def wait_until(check: Callable[[], bool], timeout_s: float, what: str, period_s: float = 0.05) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except grpc.RpcError:
            pass
        time.sleep(period_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
