"""gRPC helpers every service shares: async servers with health checking, a channel pool, metrics endpoints."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import start_http_server

from crescent.services.common import auth

log = logging.getLogger(__name__)

# Large enough for a batch of KV blocks or a long prompt; the default 4 MiB is not.
MAX_MESSAGE_BYTES = 256 * 1024 * 1024
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.enable_http_proxy", 0),  # loopback and cluster traffic must never go through a proxy
    # A peer that restarts is reachable again within a second: gRPC's default reconnect backoff grows to 120 s,
    # which kept a restarted decode worker unusable for 18 s.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    # A peer that vanishes mid-stream (kill -9, a node gone) is noticed in seconds, not at the TCP timeout.
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
]
# Servers accept the clients' keepalive pings above (the default would answer them with GOAWAY too_many_pings).
SERVER_OPTIONS = [
    *[o for o in CHANNEL_OPTIONS if not o[0].startswith("grpc.keepalive")],
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
]


class GrpcServer:
    """An asyncio gRPC server with the standard health service; serving status flips with :meth:`set_serving`.

    ``internal_token``: every call but health checks must carry it (:mod:`auth`); empty = no authentication.
    """

    def __init__(self, host: str, port: int, service_name: str, *more_services: str, internal_token: str = ""):
        self.address = f"{host}:{port}"
        self.service_name = service_name
        self.service_names = ("", service_name, *more_services)  # health answers for each (and for the server)
        self.server = grpc.aio.server(options=SERVER_OPTIONS, interceptors=auth.server_interceptors(internal_token))
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        bound = self.server.add_insecure_port(self.address)
        if bound == 0:
            raise OSError(f"cannot bind gRPC port {self.address}")
        self.port = bound  # the real port when 0 asked the OS to pick one
        self.address = f"{host}:{bound}"

    def add(self, add_fn: Callable[[object, grpc.aio.Server], None], servicer: object) -> None:
        add_fn(servicer, self.server)

    async def start(self, serving: bool = False) -> None:
        await self.server.start()
        await self.set_serving(serving)
        log.info("gRPC %s listening on %s", self.service_name, self.address)

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in self.service_names:
            await self.health.set(name, status)

    async def stop(self, grace_s: float = 2.0) -> None:
        await self.set_serving(False)
        await self.server.stop(grace_s)


class ChannelPool:
    """One aio channel per address, reused across requests (a channel per request costs a handshake); every call
    on them carries ``internal_token`` (empty = none)."""

    def __init__(self, internal_token: str = "") -> None:
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._token = internal_token

    def get(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            channel = auth.aio_channel(address, self._token, CHANNEL_OPTIONS)
            self._channels[address] = channel
        return channel

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        await asyncio.gather(*(c.close() for c in channels), return_exceptions=True)


async def check_health(address: str, timeout_s: float = 1.0, service: str = "") -> bool:
    """True when the gRPC server at ``address`` reports SERVING (health needs no internal token)."""
    async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.aio.AioRpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING


async def reachable(address: str, timeout_s: float = 1.0) -> bool:
    """False only when nothing serves ``address`` any more (the connection is refused or reset: the process is
    gone); a server that answers anything, or is too busy to answer in time, is still there."""
    async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        try:
            await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout_s,
                                                            wait_for_ready=False)
        except grpc.aio.AioRpcError as err:
            return err.code() != grpc.StatusCode.UNAVAILABLE
        return True


def start_metrics_server(host: str, port: int) -> None:
    """Expose the default Prometheus registry on ``host:port`` (0 = no metrics endpoint)."""
    if port:
        start_http_server(port, addr=host)
        log.info("metrics on http://%s:%d/metrics", host, port)
