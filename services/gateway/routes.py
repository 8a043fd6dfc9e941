"""The OpenAI endpoints: validate, tokenize, place, then answer in one JSON body or as an SSE stream."""

from __future__ import annotations

import asyncio
import functools
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from crescent.hashing import prefix_block_hashes
from crescent.proto.v1 import common_pb2
from crescent.services.common import metrics as m
from crescent.services.common.model_watch import ModelWatcher
from crescent.services.gateway import sse
from crescent.services.gateway.backend import ClusterClient, SubRequest
from crescent.services.gateway.errors import ERROR_RESPONSES, STREAM_RESPONSE, ApiError
from crescent.services.gateway.generation import Run
from crescent.services.gateway.output_controls import logit_bias_ids, response_format_wire
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
from crescent.services.gateway.tools import auto_parser, plan_tools, template_messages
from crescent.services.gateway.unsupported import check_supported

router = APIRouter(responses=ERROR_RESPONSES)
T = TypeVar("T")
MIN_TOP_P = 1e-6
"""top_p travels as a float32: a positive value below this would round to 0, which the worker refuses. Any top_p
this small keeps only the most likely token, as 1e-6 does."""


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
    tokenize_pool: ThreadPoolExecutor = field(init=False)
    """Tokenizing a long prompt takes seconds: it runs here so health and streams keep answering."""

    def __post_init__(self) -> None:
        self.tokenize_pool = ThreadPoolExecutor(self.settings.tokenizer_threads, thread_name_prefix="tokenize")

    async def offload(self, fn: Callable[..., T], *args: Any) -> T:
        """Run CPU-bound ``fn(*args)`` (tokenize, render a template, hash blocks) off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self.tokenize_pool, functools.partial(fn, *args))

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


@router.post("/v1/chat/completions", responses=STREAM_RESPONSE)
async def chat_completions(body: ChatCompletionRequest, request: Request):
    st = _state(request)
    _check_common(st, body)
    if body.top_logprobs is not None and not body.logprobs:  # else the client waits for logprobs that never come
        raise ApiError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
    encoder = st.encoder  # the model watch may swap it meanwhile: one request, one tokenizer
    plan = plan_tools(body, auto_parser(st.settings.tool_call_parser, encoder.tool_template))
    if plan is not None and plan.forced and body.response_format is not None and body.response_format.type != "text":
        raise ApiError(400, "response_format and a required or named tool_choice both constrain the output; "
                            "send one", param="response_format")
    requested = body.requested_max_tokens()
    native = encoder.template_knows_tools
    messages = template_messages(body.messages, plan, native)
    tools = [{"type": "function", "function": t} for t in plan.tools] if plan is not None and native else None
    prompt_ids = await st.offload(encoder.chat_ids, messages, True, tools)
    budget = encoder.check_length(prompt_ids, requested, param="messages")
    max_tokens = budget if requested is not None else min(budget, st.settings.default_max_tokens)
    top = (body.top_logprobs or 0) if body.logprobs else None
    renderer = ChatRenderer(encoder, top, plan)
    return await _serve(st, request, body, [prompt_ids], max_tokens, -1 if top is None else top, renderer, "chat",
                        grammar=plan.grammar() if plan is not None else "")


@router.post("/v1/completions", responses=STREAM_RESPONSE)
async def completions(body: CompletionRequest, request: Request):
    st = _state(request)
    prompts = body.prompts()
    if len(prompts) > st.settings.max_prompts:  # each prompt (x n) is a placement: bound the work one body buys
        raise ApiError(400, f"prompt holds {len(prompts)} prompts; this server takes at most "
                            f"{st.settings.max_prompts} in one request", param="prompt")
    _check_common(st, body)
    encoder = st.encoder
    prompt_ids = await st.offload(lambda: [encoder.text_ids(p) for p in prompts])
    max_tokens = min(encoder.check_length(ids, body.max_tokens, param="prompt") for ids in prompt_ids)
    if body.max_tokens is None:  # an explicit null: bounded like chat's default, not the whole context
        max_tokens = min(max_tokens, st.settings.default_max_tokens)
    echo = None
    if body.echo:  # OpenAI's echo with logprobs also scores the prompt, which the workers do not compute
        if body.logprobs is not None:
            raise ApiError(400, "echo together with logprobs is not supported (no prompt logprobs); drop one",
                           param="echo", code="unsupported_parameter")
        texts = [p if isinstance(p, str) else await st.offload(encoder.detokenize, p) for p in prompts]
        echo = [t for t in texts for _ in range(body.n)]
    renderer = CompletionRenderer(encoder, body.logprobs, len(prompt_ids) * body.n, echo)
    logprobs = -1 if body.logprobs is None else body.logprobs
    return await _serve(st, request, body, prompt_ids, max_tokens, logprobs, renderer, "completions")


def _check_common(st: GatewayState, body: _SamplingFields) -> None:
    if body.model != st.model_id:
        raise ApiError(404, f"model {body.model!r} does not exist; this server serves {st.model_id!r}",
                       param="model", code="model_not_found")
    if body.n > st.settings.max_n:
        raise ApiError(400, f"n must be at most {st.settings.max_n}", param="n")
    check_supported(body)
    if not st.ready:
        raise ApiError(503, f"not ready: {st.ready_reason}", retry_after_s=st.settings.ready_poll_s)


def _steering(st: GatewayState, body: _SamplingFields, grammar: str) -> dict:
    """The penalty, bias and structured-output fields of SamplingParams (the same for every choice); ``grammar``
    (a tool call's) takes the place of response_format."""
    return {"presence_penalty": body.presence_penalty or 0.0, "frequency_penalty": body.frequency_penalty or 0.0,
            "repetition_penalty": body.repetition_penalty or 1.0,
            "logit_bias": logit_bias_ids(body.logit_bias, getattr(st.encoder.tokenizer, "vocab_size", None)),
            "response_format": grammar or response_format_wire(body.response_format)}


def _sampling(body: _SamplingFields, max_tokens: int, logprobs: int, choice: int,
              steering: dict) -> common_pb2.SamplingParams:
    params = common_pb2.SamplingParams(**steering,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else max(body.top_p, MIN_TOP_P), top_k=body.top_k or -1, max_tokens=max_tokens,
        stop=body.stop_list(), stop_token_ids=body.stop_token_ids or [], ignore_eos=body.ignore_eos,
        logprobs=logprobs, min_tokens=min(body.min_tokens, max_tokens))
    if body.seed is not None:
        params.seed = (body.seed + choice) % 2**64  # n seeded choices must differ, reproducibly
    return params


async def _serve(st: GatewayState, request: Request, body: _SamplingFields, prompts: list[list[int]],
                 max_tokens: int, logprobs: int, renderer, endpoint: str, grammar: str = ""):
    request_id = request.state.request_id
    # The client's X-Request-Id is for tracing and need not be unique; the cluster's ids must be.
    internal_id = f"{request_id[:64]}-{uuid.uuid4().hex[:8]}"
    subs = []
    steering = _steering(st, body, grammar)
    all_hashes = await st.offload(lambda: [prefix_block_hashes(ids, st.settings.kv_block_size, st.hash_model_id)
                                           for ids in prompts])
    for p, (ids, hashes) in enumerate(zip(prompts, all_hashes, strict=True)):
        for j in range(body.n):
            k = p * body.n + j
            subs.append(SubRequest(f"{internal_id}-{k}", st.model_id, ids, hashes, _sampling(body, max_tokens,
                                                                                         logprobs, j, steering)))
    run = Run(st.client, subs, hasher=lambda ids: prefix_block_hashes(ids, st.settings.kv_block_size, st.hash_model_id),
              resume_timeout_s=st.settings.resume_timeout_s)
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
    m.GATEWAY_REQUESTS.labels(model_name=st.model_id, endpoint=endpoint, outcome="ok").inc()
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
        m.GATEWAY_REQUESTS.labels(model_name=model, endpoint=endpoint, outcome=outcome).inc()
