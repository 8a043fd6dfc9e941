"""The OpenAI endpoints: validate, tokenize, place, then answer in one JSON body or as an SSE stream."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from crescent.hashing import prefix_block_hashes
from crescent.proto.v1 import common_pb2
from crescent.services.common import metrics as m
from crescent.services.common.model_watch import ModelWatcher
from crescent.services.gateway import sse
from crescent.services.gateway.backend import ClusterClient, SubRequest
from crescent.services.gateway.errors import ApiError
from crescent.services.gateway.generation import Run
from crescent.services.gateway.render import ChatRenderer, CompletionRenderer, chunk
from crescent.services.gateway.schema import (
    ChatCompletionRequest,
    CompletionRequest,
    _SamplingFields,
    envelope,
    model_card,
    usage,
)
from crescent.services.gateway.settings import GatewaySettings
from crescent.services.gateway.tokens import PromptEncoder

router = APIRouter()


@dataclass
class GatewayState:
    settings: GatewaySettings
    encoder: PromptEncoder
    client: ClusterClient
    model_id: str
    ready: bool = False
    ready_reason: str = "starting"
    background: list = field(default_factory=list)
    model_watch: ModelWatcher | None = None
    """Set when the model is a published model directory: the version followed for block hashing."""

    @property
    def hash_model_id(self) -> str:
        """The block-hash namespace: ``name@version`` for a published model (the served name stays stable)."""
        if self.model_watch is None or self.model_watch.current is None:
            return self.model_id
        return self.model_watch.model_id


def _state(request: Request) -> GatewayState:
    return request.app.state.gateway


@router.get("/v1/models")
async def list_models(request: Request) -> dict:
    st = _state(request)
    card = model_card(st.model_id, st.encoder.max_model_len)
    if st.model_watch is not None:  # extra fields: OpenAI clients keep them as attributes
        card.update(st.model_watch.describe())
    return {"object": "list", "data": [card]}


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    st = _state(request)
    _check_common(st, body)
    messages = [{"role": "system" if msg.role == "developer" else msg.role, "content": msg.text()}
                for msg in body.messages]
    prompt_ids = st.encoder.chat_ids(messages)
    requested = body.requested_max_tokens()
    budget = st.encoder.check_length(prompt_ids, requested)
    max_tokens = budget if requested is not None else min(budget, st.settings.default_max_tokens)
    top = (body.top_logprobs or 0) if body.logprobs else None
    renderer = ChatRenderer(st.encoder, top)
    return await _serve(st, request, body, [prompt_ids], max_tokens, -1 if top is None else top, renderer, "chat")


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    st = _state(request)
    _check_common(st, body)
    if body.echo or body.suffix:
        raise ApiError(400, "echo and suffix are not supported", param="echo" if body.echo else "suffix")
    prompts = body.prompt if isinstance(body.prompt, list) and body.prompt and not isinstance(body.prompt[0], int) \
        else [body.prompt]
    prompt_ids = [st.encoder.text_ids(p) for p in prompts]  # type: ignore[arg-type]
    max_tokens = min(st.encoder.check_length(ids, body.max_tokens) for ids in prompt_ids)
    if body.max_tokens is None:  # an explicit null: bounded like chat's default, not the whole context
        max_tokens = min(max_tokens, st.settings.default_max_tokens)
    renderer = CompletionRenderer(st.encoder, body.logprobs, len(prompt_ids) * body.n)
    logprobs = -1 if body.logprobs is None else body.logprobs
    return await _serve(st, request, body, prompt_ids, max_tokens, logprobs, renderer, "completions")


def _check_common(st: GatewayState, body: _SamplingFields) -> None:
    if body.model != st.model_id:
        raise ApiError(404, f"model {body.model!r} does not exist; this server serves {st.model_id!r}",
                       param="model", code="model_not_found")
    if body.n > st.settings.max_n:
        raise ApiError(400, f"n must be at most {st.settings.max_n}", param="n")
    if body.presence_penalty or body.frequency_penalty:
        raise ApiError(400, "presence_penalty and frequency_penalty are not supported", param="presence_penalty")
    if not st.ready:
        raise ApiError(503, f"not ready: {st.ready_reason}", retry_after_s=st.settings.ready_poll_s)


def _sampling(body: _SamplingFields, max_tokens: int, logprobs: int, choice: int) -> common_pb2.SamplingParams:
    params = common_pb2.SamplingParams(
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p, top_k=body.top_k or -1, max_tokens=max_tokens,
        stop=body.stop_list(), stop_token_ids=body.stop_token_ids or [], ignore_eos=body.ignore_eos,
        logprobs=logprobs, min_tokens=min(body.min_tokens, max_tokens))
    if body.seed is not None:
        params.seed = (body.seed + choice) % 2**64  # n seeded choices must differ, reproducibly
    return params


async def _serve(st: GatewayState, request: Request, body: _SamplingFields, prompts: list[list[int]],
                 max_tokens: int, logprobs: int, renderer, endpoint: str):
    request_id = request.state.request_id
    # The client's X-Request-Id is for tracing and need not be unique; the cluster's ids must be.
    internal_id = f"{request_id[:64]}-{uuid.uuid4().hex[:8]}"
    subs = []
    for p, ids in enumerate(prompts):
        hashes = prefix_block_hashes(ids, st.settings.kv_block_size, st.hash_model_id)
        for j in range(body.n):
            k = p * body.n + j
            subs.append(SubRequest(f"{internal_id}-{k}", st.model_id, ids, hashes, _sampling(body, max_tokens,
                                                                                         logprobs, j)))
    run = Run(st.client, subs)
    await run.place_all(max_tokens)  # a rejection is a plain 429 here, before any byte is sent
    created = int(time.time())
    response_id = ("chatcmpl-" if endpoint == "chat" else "cmpl-") + request_id
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_stream(run, renderer, response_id, st.model_id, created, include_usage, body.n,
                                         endpoint), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    async for _ in run.deltas():  # errors are counted by the error handler
        pass
    m.GATEWAY_REQUESTS.labels(endpoint=endpoint, outcome="ok").inc()
    result = envelope(renderer.object_full, response_id, st.model_id,
                      [renderer.full_choice(s) for s in run.states], created)
    result["usage"] = _usage(run, body.n)
    return JSONResponse(result)


def _usage(run: Run, n: int) -> dict:
    prompt = sum(s.prompt_tokens for s in run.states[::n])  # the same prompt serves all n choices: count it once
    cached = sum(min(s.cached_tokens, s.prompt_tokens) for s in run.states[::n])
    completion = sum(len(s.token_ids) for s in run.states)
    return usage(prompt, completion, cached)


async def _stream(run: Run, renderer, response_id: str, model: str, created: int, include_usage: bool, n: int,
                  endpoint: str) -> AsyncIterator[str]:
    outcome = "cancelled"
    try:
        opening = renderer.opening(len(run.subs))
        if opening:
            yield sse.event(chunk(renderer, response_id, model, created, opening, include_usage))
        try:
            async for delta in run.deltas():
                choice = renderer.chunk_choice(delta)
                yield sse.event(chunk(renderer, response_id, model, created, [choice], include_usage))
        except Exception as exc:  # the status line is sent: report the failure in the stream itself
            outcome = "error"
            err = exc if isinstance(exc, ApiError) else ApiError(500, f"internal error: {type(exc).__name__}")
            yield sse.error_event(err.body())
            yield sse.DONE
            return
        if include_usage:
            final = chunk(renderer, response_id, model, created, [], False)
            final["usage"] = _usage(run, n)
            yield sse.event(final)
        yield sse.DONE
        outcome = "ok"
    finally:
        m.GATEWAY_REQUESTS.labels(endpoint=endpoint, outcome=outcome).inc()
