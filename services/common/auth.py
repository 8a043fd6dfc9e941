"""Authentication inside the cluster: one shared token (``internal_token``) that internal traffic carries.

gRPC: every call carries ``authorization: Bearer <token>`` metadata (a client interceptor adds it) and every
service's server checks it (a server interceptor) before the servicer runs, answering UNAUTHENTICATED otherwise.
The standard health service stays open (Kubernetes probes and ``crescent-healthcheck`` carry no secret), and
/metrics is plain HTTP on its own port. The kvstore data port checks the same token in a handshake frame
(``wire.Op.AUTH``), once per connection. Tokens are compared in constant time.
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import logging

import grpc

log = logging.getLogger(__name__)

METADATA_KEY = "authorization"
SCHEME = "Bearer "
OPEN_PREFIX = "/grpc.health.v1.Health/"  # probes carry no secret and learn nothing but SERVING/NOT_SERVING
NO_TOKEN_WARNING = ("no internal token set: internal gRPC and the kvstore data port accept any client; set "
                    "CRESCENT_INTERNAL_TOKEN or --internal-token-file (crescent up and the Helm chart generate one)")


def token_matches(presented: str | bytes, token: str) -> bool:
    """Whether ``presented`` is ``token``, in time that does not depend on where they differ."""
    if isinstance(presented, str):
        presented = presented.encode("utf-8", "replace")
    return hmac.compare_digest(presented, token.encode())


def warn_if_open(token: str, service: str) -> None:
    """One warning at start when this service runs without internal authentication."""
    if not token:
        log.warning("%s: %s", service, NO_TOKEN_WARNING)


def call_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """The metadata an internal call carries (none without a token)."""
    return ((METADATA_KEY, SCHEME + token),) if token else ()


def _presented(metadata) -> str:
    for key, value in metadata or ():
        if key == METADATA_KEY:
            return value[len(SCHEME):] if isinstance(value, str) and value.startswith(SCHEME) else ""
    return ""


# --- server side -------------------------------------------------------------------------------------------------
class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every call but health checks whose metadata lacks the token: UNAUTHENTICATED, before the
    servicer (and its request deserializer's work) ever runs."""

    def __init__(self, token: str):
        if not token:
            raise ValueError("TokenAuthInterceptor needs a token; run without the interceptor for no authentication")
        self.token = token

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        if details.method.startswith(OPEN_PREFIX):
            return await continuation(details)
        presented = _presented(details.invocation_metadata)
        if presented and token_matches(presented, self.token):
            return await continuation(details)
        handler = await continuation(details)
        if handler is None:  # an unknown method: UNIMPLEMENTED as before
            return None
        reason = "wrong internal token" if presented else "no internal token"
        log.warning("refused %s: %s", details.method, reason)
        return _refusal(handler, f"{reason}: internal calls need metadata '{METADATA_KEY}: Bearer <token>' "
                                 f"with this cluster's internal_token (CRESCENT_INTERNAL_TOKEN)")


_DRAIN_MESSAGES, _DRAIN_S = 16, 0.2  # what a refused streaming client may still send first


def _refusal(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` that only aborts with UNAUTHENTICATED."""

    async def refuse(request_or_iterator, context: grpc.aio.ServicerContext):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def refuse_stream(request_iterator, context: grpc.aio.ServicerContext):
        # Read what the client already sent (bounded: a few messages, a moment) before refusing: a refusal while the
        # client is still writing can reach it as a reset (INTERNAL) instead of this status.
        async def drain() -> None:
            count = 0
            async for _ in request_iterator:
                count += 1
                if count >= _DRAIN_MESSAGES:
                    return

        try:
            await asyncio.wait_for(drain(), timeout=_DRAIN_S)
        except (asyncio.TimeoutError, grpc.RpcError):
            pass
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    serde = {"request_deserializer": handler.request_deserializer,
             "response_serializer": handler.response_serializer}
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse_stream, **serde)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse_stream, **serde)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse, **serde)
    return grpc.unary_unary_rpc_method_handler(refuse, **serde)


def server_interceptors(token: str) -> list[grpc.aio.ServerInterceptor]:
    return [TokenAuthInterceptor(token)] if token else []


# --- client side -------------------------------------------------------------------------------------------------
def _with_token(details, token: str):
    metadata = grpc.aio.Metadata(*(details.metadata or ()))
    metadata.add(METADATA_KEY, SCHEME + token)
    return details._replace(metadata=metadata)


class _UnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, token: str):
        self.token = token

    async def intercept_unary_unary(self, continuation, details, request):
        return await continuation(_with_token(details, self.token), request)


class _UnaryStream(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, token: str):
        self.token = token

    async def intercept_unary_stream(self, continuation, details, request):
        return await continuation(_with_token(details, self.token), request)


class _StreamUnary(grpc.aio.StreamUnaryClientInterceptor):
    def __init__(self, token: str):
        self.token = token

    async def intercept_stream_unary(self, continuation, details, request_iterator):
        return await continuation(_with_token(details, self.token), request_iterator)


class _StreamStream(grpc.aio.StreamStreamClientInterceptor):
    def __init__(self, token: str):
        self.token = token

    async def intercept_stream_stream(self, continuation, details, request_iterator):
        return await continuation(_with_token(details, self.token), request_iterator)


def aio_channel(address: str, token: str, options: list) -> grpc.aio.Channel:
    """An aio channel to an internal service whose calls, of every kind, carry ``token`` (none when empty)."""
    # one interceptor object per call kind: the aio channel files each object under the first kind it matches
    interceptors = [kind(token) for kind in (_UnaryUnary, _UnaryStream, _StreamUnary, _StreamStream)] if token else None
    return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)


class _SyncDetails(collections.namedtuple("_SyncDetails", ("method", "timeout", "metadata", "credentials",
                                                          "wait_for_ready", "compression")),
                   grpc.ClientCallDetails):
    pass


class _SyncTokenInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    def __init__(self, token: str):
        self.token = token

    def _details(self, details: grpc.ClientCallDetails) -> _SyncDetails:
        metadata = [*(details.metadata or ()), (METADATA_KEY, SCHEME + self.token)]
        return _SyncDetails(details.method, details.timeout, metadata, details.credentials,
                            getattr(details, "wait_for_ready", None), getattr(details, "compression", None))

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)


def sync_channel(address: str, token: str, options: list) -> grpc.Channel:
    """A blocking channel to an internal service whose unary calls carry ``token`` (none when empty)."""
    channel = grpc.insecure_channel(address, options=options)
    return grpc.intercept_channel(channel, _SyncTokenInterceptor(token)) if token else channel
