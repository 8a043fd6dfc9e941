"""The gateway process: FastAPI app (OpenAI API, /health, /metrics) served by uvicorn."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from contextlib import asynccontextmanager

import uvicorn
from fastapi import FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from crescent.services.common import metrics as m
from crescent.services.common.model_watch import first_version, watcher_for
from crescent.services.gateway.backend import ClusterClient
from crescent.services.gateway.errors import ApiError, install_error_handlers
from crescent.services.gateway.model_follow import watch_gateway_model
from crescent.services.gateway.routes import GatewayState, router
from crescent.services.gateway.settings import GatewaySettings
from crescent.services.gateway.tokens import PromptEncoder, load_encoder

log = logging.getLogger(__name__)


class RequestContext:
    """Pure ASGI middleware (streams pass through untouched): request id, API key, in-flight gauge."""

    def __init__(self, app: ASGIApp, api_key: str):
        self.app = app
        self.api_key = api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        request_id = headers.get(b"x-request-id", b"").decode("latin-1")[:128] or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode("latin-1"))]
            await send(message)

        if self.api_key and scope["path"].startswith("/v1/"):
            if headers.get(b"authorization", b"").decode("latin-1") != f"Bearer {self.api_key}":
                await ApiError(401, "invalid or missing API key", code="invalid_api_key").response()(
                    scope, receive, send_with_id)
                return
        m.GATEWAY_IN_FLIGHT.inc()
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            m.GATEWAY_IN_FLIGHT.dec()


async def _poll_ready(state: GatewayState) -> None:
    """Readiness follows the cluster: the conductor must answer and know a prefill and a decode instance."""
    while True:
        ready, reason = await state.client.ready()
        if ready != state.ready:
            log.info("gateway %s (%s)", "ready" if ready else "not ready", reason)
        state.ready, state.ready_reason = ready, reason
        await asyncio.sleep(state.settings.ready_poll_s)


def create_app(settings: GatewaySettings, encoder: PromptEncoder | None = None,
               client: ClusterClient | None = None) -> FastAPI:
    """The ASGI app; ``encoder``/``client`` default to the model's tokenizer and the real cluster."""
    model_id = settings.model_id()
    watch = watcher_for(settings.model, settings.served_model_name)  # a published model directory
    if watch is not None:
        watch.accept(first_version(watch))
    if encoder is None:
        encoder, model_dir = load_encoder(str(watch.current) if watch else settings.model, settings.max_model_len)
        model_id = settings.served_model_name or model_dir.name  # the same default name the workers use
    if watch is not None:
        model_id = watch.name  # stable across versions; the version only changes the hash namespace
    client = client or ClusterClient(settings.conductor_address, settings.rpc_timeout_s, settings.request_timeout_s,
                                     settings.kv_block_size)
    state = GatewayState(settings, encoder, client, model_id, model_watch=watch)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        tasks = [asyncio.create_task(_poll_ready(state))]
        if watch is not None and settings.model_watch_interval_s > 0:
            tasks.append(asyncio.create_task(watch_gateway_model(state)))
        yield
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await client.close()

    app = FastAPI(title="crescent", lifespan=lifespan)
    app.state.gateway = state
    install_error_handlers(app)
    app.include_router(router)

    @app.get("/health")
    async def health(request: Request) -> Response:
        if not state.ready:
            raise ApiError(503, f"not ready: {state.ready_reason}", retry_after_s=settings.ready_poll_s)
        return Response("ok", media_type="text/plain")

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(RequestContext, api_key=settings.api_key)
    return app


def serve(settings: GatewaySettings) -> None:
    try:
        app = create_app(settings)
    except Exception as exc:  # e.g. no such model folder: one clear line, not a traceback
        log.error("gateway cannot start: %s: %s", type(exc).__name__, exc)
        raise SystemExit(1) from None
    log.info("OpenAI API on http://%s:%d/v1 (model %s)", settings.host, settings.port,
             app.state.gateway.model_id)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level.lower(),
                timeout_graceful_shutdown=5)
