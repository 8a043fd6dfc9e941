"""The internal-token interceptors on a real loopback gRPC server: every call kind refused without the token (before
the handler runs), served with it; health open; aio and blocking clients both send it."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from crescent.services.common import auth
from crescent.services.common.grpc_util import CHANNEL_OPTIONS, GrpcServer

TOKEN = "s3cret-token"
SERVICE = "crescent.test.Echo"


def _echo_handlers(calls: list[str]) -> grpc.GenericRpcHandler:
    """Raw-bytes methods of all four kinds; ``calls`` records which handlers actually ran."""

    async def unary(request: bytes, context) -> bytes:
        calls.append("unary")
        return request

    async def server_stream(request: bytes, context):
        calls.append("server_stream")
        for _ in range(2):
            yield request

    async def client_stream(requests, context) -> bytes:
        calls.append("client_stream")
        return b"".join([r async for r in requests])

    async def both_stream(requests, context):
        calls.append("both_stream")
        async for r in requests:
            yield r

    return grpc.method_handlers_generic_handler(SERVICE, {
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "ServerStream": grpc.unary_stream_rpc_method_handler(server_stream),
        "ClientStream": grpc.stream_unary_rpc_method_handler(client_stream),
        "BothStream": grpc.stream_stream_rpc_method_handler(both_stream),
    })


async def _all_kinds(channel: grpc.aio.Channel) -> list[object]:
    """Each kind's result, or the status code it failed with."""
    out: list[object] = []

    async def chunks():
        yield b"a"
        yield b"b"

    calls = [
        lambda: channel.unary_unary(f"/{SERVICE}/Unary")(b"x", timeout=5),
        lambda: _collect(channel.unary_stream(f"/{SERVICE}/ServerStream")(b"y", timeout=5)),
        lambda: channel.stream_unary(f"/{SERVICE}/ClientStream")(chunks(), timeout=5),
        lambda: _collect(channel.stream_stream(f"/{SERVICE}/BothStream")(chunks(), timeout=5)),
    ]
    for call in calls:
        try:
            out.append(await call())
        except grpc.aio.AioRpcError as err:
            out.append((err.code(), err.details()))
    return out


async def _collect(call) -> list[bytes]:
    return [r async for r in call]


def _serve_and(check, token: str = TOKEN):
    """Start a GrpcServer with the echo methods, run ``check(address, calls)``, stop it."""

    async def main():
        calls: list[str] = []
        server = GrpcServer("127.0.0.1", 0, SERVICE, internal_token=token)
        server.server.add_generic_rpc_handlers((_echo_handlers(calls),))
        await server.start(serving=True)
        try:
            return await check(server.address, calls)
        finally:
            await server.stop(grace_s=0.1)

    return asyncio.run(main())


EXPECTED = [b"x", [b"y", b"y"], b"ab", [b"a", b"b"]]


@pytest.mark.parametrize("client_token", ["", "wrong-token"], ids=["none", "wrong"])
def test_every_call_kind_is_refused_without_the_token_and_no_handler_runs(client_token):
    async def check(address, calls):
        async with auth.aio_channel(address, client_token, CHANNEL_OPTIONS) as channel:
            return await _all_kinds(channel), list(calls)

    results, ran = _serve_and(check)
    assert ran == []
    for code, details in results:
        assert code == grpc.StatusCode.UNAUTHENTICATED
        assert ("wrong internal token" if client_token else "no internal token") in details
        assert "CRESCENT_INTERNAL_TOKEN" in details and TOKEN not in details


def test_the_aio_client_with_the_token_is_served_on_every_call_kind():
    async def check(address, calls):
        async with auth.aio_channel(address, TOKEN, CHANNEL_OPTIONS) as channel:
            return await _all_kinds(channel), list(calls)

    results, ran = _serve_and(check)
    assert results == EXPECTED
    assert ran == ["unary", "server_stream", "client_stream", "both_stream"]


def test_the_blocking_client_sends_the_token_and_health_needs_none():
    def blocking(address: str, token: str) -> object:
        with auth.sync_channel(address, token, CHANNEL_OPTIONS) as channel:
            try:
                return channel.unary_unary(f"/{SERVICE}/Unary")(b"z", timeout=5)
            except grpc.RpcError as err:
                return err.code()

    def health(address: str) -> int:
        with grpc.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
            return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status

    async def check(address, calls):
        return (await asyncio.to_thread(blocking, address, TOKEN), await asyncio.to_thread(blocking, address, ""),
                await asyncio.to_thread(health, address))

    with_token, without, status = _serve_and(check)
    assert with_token == b"z" and without == grpc.StatusCode.UNAUTHENTICATED
    assert status == health_pb2.HealthCheckResponse.SERVING


def test_a_server_without_a_token_serves_clients_that_send_one():
    async def check(address, calls):
        async with auth.aio_channel(address, TOKEN, CHANNEL_OPTIONS) as channel:
            return await _all_kinds(channel)

    assert _serve_and(check, token="") == EXPECTED


def test_tokens_compare_whole():
    assert auth.token_matches(TOKEN, TOKEN) and auth.token_matches(TOKEN.encode(), TOKEN)
    assert not auth.token_matches(TOKEN[:-1], TOKEN) and not auth.token_matches(TOKEN + "x", TOKEN)
    assert not auth.token_matches("", TOKEN)
    assert auth.call_metadata("") == () and auth.call_metadata("t") == (("authorization", "Bearer t"),)
    with pytest.raises(ValueError, match="needs a token"):
        auth.TokenAuthInterceptor("")
