"""Pure ASGI middleware of the gateway (streams pass through untouched).

Outermost first: CORS (added in server.py, so preflights and error answers carry its headers), then
:class:`RequestContext` (request id, API key, in-flight gauge), then :class:`BodyLimit` (413 before a large body is
read), then the app.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from crescent.services.common import metrics as m
from crescent.services.gateway.errors import ApiError, count_outcome

log = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/health", "/metrics"})
"""Paths that answer without an API key: probes and Prometheus do not carry one."""


def _digest(key: str | bytes) -> bytes:
    return hashlib.sha256(key.encode("utf-8") if isinstance(key, str) else key).digest()


class RequestContext:
    """Request id (the client's ``X-Request-Id`` or a new one, echoed back), API key check, in-flight gauge."""

    def __init__(self, app: ASGIApp, api_keys: list[str], model_name: str):
        self.app = app
        self.model_name = model_name  # the served model: the metrics' model_name label
        # Compare fixed-size digests in constant time: neither a key's bytes nor its length leak through timing.
        self.key_digests = [_digest(k) for k in api_keys]

    def authorized(self, authorization: bytes) -> bool:
        scheme, _, token = authorization.partition(b" ")
        given = _digest(token.strip() if scheme.lower() == b"bearer" else b"")
        ok = False
        for key in self.key_digests:  # every key is compared, whichever matches
            ok |= hmac.compare_digest(given, key)
        return ok

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        request_id = headers.get(b"x-request-id", b"").decode("latin-1")[:128] or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id

        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode("latin-1"))]
            await send(message)

        if self.key_digests and scope["path"] not in OPEN_PATHS \
                and not self.authorized(headers.get(b"authorization", b"")):
            await ApiError(401, "invalid or missing API key", code="invalid_api_key").response()(
                scope, receive, send_with_id)
            return
        in_flight = m.GATEWAY_IN_FLIGHT.labels(model_name=self.model_name)
        in_flight.inc()
        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:
            if started:
                raise  # nothing can be said any more; the server ends the connection
            # Answered here, not by Starlette's last-resort handler: that one re-raises after its 500, and the
            # server then closes the client's keep-alive connection. A bug costs one request, not a connection.
            log.exception("unhandled error on %s", scope["path"])
            count_outcome(scope["path"], 500, self.model_name)
            await ApiError(500, f"internal error: {type(exc).__name__}").response()(scope, receive, send_with_id)
        finally:
            in_flight.dec()


class BodyLimit:
    """Answer 413 to a body over ``max_bytes``: at once when Content-Length says so, else as soon as the bytes
    read pass it. The body is read here, in full, before the app runs (FastAPI would read it all anyway), and
    replayed to the app: raising from ``receive`` instead would reach FastAPI's body parser, which turns any error
    into a 400. After a 413 the server discards the rest of the body and keeps the connection alive."""

    def __init__(self, app: ASGIApp, max_bytes: int, model_name: str):
        self.app = app
        self.max_bytes = max_bytes
        self.model_name = model_name

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._too_large(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending it all
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await self._too_large(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # after the body: wait for the disconnect (streams listen for it)

        await self.app(scope, replay, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        count_outcome(scope["path"], 413, self.model_name)
        err = ApiError(413, f"the request body is larger than this server's limit of {self.max_bytes} bytes",
                       code="request_too_large")
        await err.response()(scope, receive, send)
