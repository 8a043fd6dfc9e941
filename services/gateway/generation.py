"""Runs one API request's choices (n sub-requests) through the cluster and merges their token streams.

The choices run concurrently; their chunks are merged in arrival order. Whatever ends the run (done, error, client
gone), every sub-request is cancelled and reported to the conductor with Finish, shielded from cancellation.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import anyio

from crescent.proto.v1 import common_pb2
from crescent.services.common import metrics as m
from crescent.services.gateway.backend import ClusterClient, SubRequest, cancel_all
from crescent.services.gateway.errors import ApiError

_FINISH = {common_pb2.FINISH_REASON_STOP: "stop", common_pb2.FINISH_REASON_LENGTH: "length"}


@dataclass
class Delta:
    """New output of one choice."""

    index: int
    token_ids: list[int]
    text: str
    logprobs: list[common_pb2.TokenLogprob]
    finish_reason: str | None


@dataclass
class ChoiceState:
    """Everything one choice produced so far."""

    index: int
    prompt_tokens: int
    text_parts: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[common_pb2.TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    cached_tokens: int = 0
    first_at: float | None = None
    last_at: float | None = None

    @property
    def text(self) -> str:
        return "".join(self.text_parts)


class Run:
    """The sub-requests of one API request, placed and then generated together."""

    def __init__(self, client: ClusterClient, subs: list[SubRequest]):
        self.client = client
        self.subs = subs
        self.states = [ChoiceState(i, len(s.prompt_ids)) for i, s in enumerate(subs)]
        self.started = time.monotonic()
        self.ok = False

    async def place_all(self, max_tokens: int) -> None:
        """Admit every choice or none: on a rejection, the admitted ones are finished at once."""
        results = await asyncio.gather(*(self.client.place(s, max_tokens) for s in self.subs), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            await self._finish_all()
            for err in errors:
                if isinstance(err, ApiError) and err.status == 429:
                    m.GATEWAY_REJECTIONS.labels(reason=err.code or "rejected").inc()
            raise errors[0]
        for sub in self.subs:
            m.GATEWAY_PROMPT_TOKENS.inc(len(sub.prompt_ids))

    async def deltas(self) -> AsyncIterator[Delta]:
        queue: asyncio.Queue = asyncio.Queue()
        tasks = [asyncio.create_task(self._pump(i, s, queue)) for i, s in enumerate(self.subs)]
        try:
            remaining = len(tasks)
            while remaining:
                item = await queue.get()
                if isinstance(item, Delta):
                    self._observe(item)
                    yield item
                elif item is not None:
                    raise item
                else:
                    remaining -= 1
            self.ok = True
        finally:
            with anyio.CancelScope(shield=True):  # runs even when the client disconnected
                await cancel_all(tasks)
                await self._finish_all()

    async def _pump(self, index: int, sub: SubRequest, queue: asyncio.Queue) -> None:
        try:
            finished = False
            async for chunk in self.client.generate(sub):
                if chunk.finish_reason == common_pb2.FINISH_REASON_ABORT:
                    raise ApiError(503, "the decode worker aborted the request", retry_after_s=1.0)
                self.states[index].cached_tokens = sub.reused_tokens
                if finished:
                    continue  # nothing follows a finish; drain to the end so the RPC completes, not cancels
                reason = _FINISH.get(chunk.finish_reason)
                await queue.put(Delta(index, list(chunk.token_ids), chunk.text, list(chunk.logprobs), reason))
                finished = reason is not None
            if not finished:
                raise ApiError(502, "the decode stream ended without a finish reason")
            await queue.put(None)
        except Exception as exc:  # forwarded to the consumer, which raises it in the request's context
            await queue.put(exc)

    def _observe(self, delta: Delta) -> None:
        state = self.states[delta.index]
        now = time.monotonic()
        if state.first_at is None:
            state.first_at = now
            ttft = now - self.subs[delta.index].started
            m.GATEWAY_TTFT.observe(ttft)
            m.VLLM_TTFT.observe(ttft)
        elif delta.token_ids and state.last_at is not None:
            gap = (now - state.last_at) / len(delta.token_ids)
            m.GATEWAY_ITL.observe(gap)
            m.VLLM_ITL.observe(gap)
        state.last_at = now
        state.text_parts.append(delta.text)
        state.token_ids.extend(delta.token_ids)
        state.logprobs.extend(delta.logprobs)
        state.finish_reason = delta.finish_reason or state.finish_reason
        m.GATEWAY_GENERATION_TOKENS.inc(len(delta.token_ids))

    async def _finish_all(self) -> None:
        calls = []
        for sub, state in zip(self.subs, self.states, strict=True):
            ttft = (state.first_at - sub.started) if state.first_at else 0.0
            n = len(state.token_ids)
            tbt = ((state.last_at - state.first_at) / (n - 1)) if n > 1 and state.first_at and state.last_at else 0.0
            calls.append(self.client.finish(sub, ok=self.ok, completion_tokens=n, ttft_s=ttft, mean_tbt_s=tbt))
        await asyncio.gather(*calls, return_exceptions=True)
        e2e = time.monotonic() - self.started
        m.GATEWAY_E2E.observe(e2e)
        m.VLLM_E2E.observe(e2e)
