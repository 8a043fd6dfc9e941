"""The gateway process: FastAPI app (OpenAI API, /health, /metrics) served by uvicorn."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from contextlib import asynccontextmanager

import uvicorn
from fastapi import FastAPI, Request, Response
from fastapi.middleware.cors import CORSMiddleware
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from crescent.services.common.auth import warn_if_open
from crescent.services.common.model_watch import first_version, watcher_for
from crescent.services.gateway.backend import ClusterClient
from crescent.services.gateway.errors import ApiError, install_error_handlers
from crescent.services.gateway.middleware import BodyLimit, RequestContext
from crescent.services.gateway.model_follow import watch_gateway_model
from crescent.services.gateway.routes import GatewayState, router
from crescent.services.gateway.settings import GatewaySettings
from crescent.services.gateway.tokenize import router as tokenize_router
from crescent.services.gateway.tokens import PromptEncoder, load_encoder

log = logging.getLogger(__name__)


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
    api_keys = settings.api_keys()  # first: a missing key file must stop the start, before the model loads
    watch = watcher_for(settings.model, settings.served_model_name)  # a published model directory
    if watch is not None:
        watch.accept(first_version(watch))
    if encoder is None:
        encoder, model_dir = load_encoder(str(watch.current) if watch else settings.model, settings.max_model_len)
        model_id = settings.served_model_name or model_dir.name  # the same default name the workers use
    if watch is not None:
        model_id = watch.name  # stable across versions; the version only changes the hash namespace
    client = client or ClusterClient(settings.conductor_address, settings.rpc_timeout_s, settings.request_timeout_s,
                                     settings.kv_block_size, settings.internal_token_value())
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
        state.tokenize_pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="crescent", lifespan=lifespan)
    app.state.gateway = state
    install_error_handlers(app)
    app.include_router(router)
    app.include_router(tokenize_router)
    _openapi_without_422(app)

    @app.get("/health")
    async def health(request: Request) -> Response:
        if not state.ready:
            raise ApiError(503, f"not ready: {state.ready_reason}", retry_after_s=settings.ready_poll_s)
        return Response("ok", media_type="text/plain")

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    # add_middleware wraps: the last added runs first (see middleware.py for the order and why)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes, model_name=model_id)
    app.add_middleware(RequestContext, api_keys=api_keys, model_name=model_id)
    if settings.cors_allow_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_allow_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type", "X-Request-Id"],
                           expose_headers=["X-Request-Id", "Retry-After"],
                           allow_credentials=settings.cors_allow_credentials)
    return app


def _openapi_without_422(app: FastAPI) -> None:
    """FastAPI documents a 422 for every body; validation errors are 400s here (errors.py), so drop it."""
    generate = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            for path in generate()["paths"].values():
                for operation in path.values():
                    operation.get("responses", {}).pop("422", None)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def serve(settings: GatewaySettings) -> None:
    warn_if_open(settings.internal_token_value(), "gateway")
    try:
        app = create_app(settings)
    except Exception as exc:  # e.g. no such model folder: one clear line, not a traceback
        log.error("gateway cannot start: %s: %s", type(exc).__name__, exc)
        raise SystemExit(1) from None
    log.info("OpenAI API on http://%s:%d/v1 (model %s)", settings.host, settings.port,
             app.state.gateway.model_id)
    uvicorn.Server(uvicorn_config(app, settings)).run()


def uvicorn_config(app: FastAPI, settings: GatewaySettings) -> uvicorn.Config:
    return uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level.lower(),
                          timeout_graceful_shutdown=5, timeout_keep_alive=settings.keep_alive_timeout_s)
