"""Runs one API request's choices (n sub-requests) through the cluster and merges their token streams.

The choices run concurrently; their chunks are merged in arrival order. Whatever ends the run (done, error, client
gone), every sub-request is cancelled and reported to the conductor with Finish, shielded from cancellation.

A choice whose prefill or decode worker dies (its channel breaks) resumes: it is placed again, away from the dead
worker, with the prompt plus the tokens already sent as its prompt (their KV comes from the store or is
recomputed), and the client's stream goes on. Greedy output is the same as an undisturbed run's.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace

import anyio

from crescent.proto.v1 import common_pb2
from crescent.services.common import metrics as m
from crescent.services.gateway.backend import ClusterClient, SubRequest, WorkerLost, cancel_all
from crescent.services.gateway.errors import ApiError

log = logging.getLogger(__name__)
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

    def __init__(self, client: ClusterClient, subs: list[SubRequest],
                 hasher: Callable[[list[int]], list[int]] | None = None, resume_timeout_s: float = 0.0):
        self.client = client
        self.subs = subs
        self.states = [ChoiceState(i, len(s.prompt_ids)) for i, s in enumerate(subs)]
        self.started = time.monotonic()
        self.ok = False
        self.hasher = hasher
        """Prefix-block hashes of a token list (for a resumed choice's longer prompt); None: never resume."""
        self.resume_timeout_s = resume_timeout_s
        """How long a choice whose worker died may wait for a new placement (0: it fails with the worker)."""
        self.model_name = subs[0].model_id if subs else ""
        """The served model: the metrics' model_name label."""

    async def place_all(self, max_tokens: int) -> None:
        """Admit every choice or none: on a rejection, the admitted ones are finished at once."""
        results = await asyncio.gather(*(self.client.place(s, max_tokens) for s in self.subs), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            await self._finish_all()
            for err in errors:
                if isinstance(err, ApiError) and err.status == 429:
                    m.GATEWAY_REJECTIONS.labels(model_name=self.model_name, reason=err.code or "rejected").inc()
            raise errors[0]
        for sub in self.subs:
            m.GATEWAY_PROMPT_TOKENS.labels(model_name=self.model_name).inc(len(sub.prompt_ids))

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
            sent: list[int] = []  # token ids of this choice already handed to the client
            lost_at: float | None = None
            while True:
                try:
                    finished = await self._relay(index, sub, queue, sent)
                    break
                except WorkerLost as lost:
                    lost_at = lost_at or time.monotonic()
                    if self.hasher is None or time.monotonic() - lost_at > self.resume_timeout_s:
                        raise
                    sub = await self._resume(index, sub, sent, lost, lost_at)
            if not finished:
                raise ApiError(502, "the decode stream ended without a finish reason")
            await queue.put(None)
        except Exception as exc:  # forwarded to the consumer, which raises it in the request's context
            await queue.put(exc)

    async def _relay(self, index: int, sub: SubRequest, queue: asyncio.Queue, sent: list[int]) -> bool:
        """Relay one placement's stream; True when it finished (later chunks are drained, not relayed)."""
        finished = False
        async for chunk in self.client.generate(sub):
            if chunk.finish_reason == common_pb2.FINISH_REASON_ABORT:
                decode = sub.placement.decode.instance_id if sub.placement else ""
                raise WorkerLost("the decode worker aborted the request (it is shutting down)", decode)
            if not sent:
                self.states[index].cached_tokens = sub.reused_tokens
            if finished:
                continue  # nothing follows a finish; drain to the end so the RPC completes, not cancels
            reason = _FINISH.get(chunk.finish_reason)
            await queue.put(Delta(index, list(chunk.token_ids), chunk.text, list(chunk.logprobs), reason))
            sent.extend(chunk.token_ids)
            finished = reason is not None
        return finished

    async def _resume(self, index: int, sub: SubRequest, sent: list[int], lost: WorkerLost,
                      lost_at: float) -> SubRequest:
        """Place the choice again, away from the lost worker, continuing after the tokens already sent."""
        await self.client.finish(sub, ok=False, completion_tokens=len(sent), ttft_s=0.0, mean_tbt_s=0.0)
        original = self.subs[index]
        prompt = original.prompt_ids + sent
        sampling = common_pb2.SamplingParams()
        sampling.CopyFrom(original.sampling)
        sampling.max_tokens = max(1, original.sampling.max_tokens - len(sent))
        sampling.min_tokens = max(0, original.sampling.min_tokens - len(sent))
        sampling.prior_outputs = len(sent)  # the grammar, penalties and seeded draws continue after them
        attempt = sub.request_id.rsplit("~", 1)
        n = int(attempt[1]) + 1 if len(attempt) == 2 and attempt[1].isdigit() else 1
        resumed = replace(original, request_id=f"{original.request_id}~{n}", prompt_ids=prompt,
                          block_hashes=self.hasher(prompt), sampling=sampling, placement=None,
                          avoid=[*sub.avoid, lost.instance_id], started=original.started)
        m.GATEWAY_RESUMES.labels(model_name=self.model_name).inc()
        log.warning("%s: %s; resuming after %d tokens as %s", original.request_id, lost.message, len(sent),
                    resumed.request_id)
        while True:
            try:
                await self.client.place(resumed, sampling.max_tokens)
                return resumed
            except ApiError as err:  # no instance yet (a restart under way) or busy: wait within the budget
                if err.status not in (429, 503) or time.monotonic() - lost_at > self.resume_timeout_s:
                    raise
                # The only instance of a role may be the lost one, restarted under its old id: stop avoiding it
                # (if it is still dead, its channel fails at once and the next round avoids it again).
                resumed.avoid = []
                await asyncio.sleep(min(1.0, err.retry_after_s or 0.5))

    def _observe(self, delta: Delta) -> None:
        state = self.states[delta.index]
        now = time.monotonic()
        if state.first_at is None:
            state.first_at = now
            ttft = now - self.subs[delta.index].started
            m.GATEWAY_TTFT.labels(model_name=self.model_name).observe(ttft)
            m.VLLM_TTFT.labels(model_name=self.model_name).observe(ttft)
        elif delta.token_ids and state.last_at is not None:
            gap = (now - state.last_at) / len(delta.token_ids)
            m.GATEWAY_ITL.labels(model_name=self.model_name).observe(gap)
            m.VLLM_ITL.labels(model_name=self.model_name).observe(gap)
        state.last_at = now
        state.text_parts.append(delta.text)
        state.token_ids.extend(delta.token_ids)
        state.logprobs.extend(delta.logprobs)
        state.finish_reason = delta.finish_reason or state.finish_reason
        m.GATEWAY_GENERATION_TOKENS.labels(model_name=self.model_name).inc(len(delta.token_ids))

    async def _finish_all(self) -> None:
        calls = []
        for sub, state in zip(self.subs, self.states, strict=True):
            ttft = (state.first_at - sub.started) if state.first_at else 0.0
            n = len(state.token_ids)
            tbt = ((state.last_at - state.first_at) / (n - 1)) if n > 1 and state.first_at and state.last_at else 0.0
            calls.append(self.client.finish(sub, ok=self.ok, completion_tokens=n, ttft_s=ttft, mean_tbt_s=tbt))
        await asyncio.gather(*calls, return_exceptions=True)
        e2e = time.monotonic() - self.started
        m.GATEWAY_E2E.labels(model_name=self.model_name).observe(e2e)
        m.VLLM_E2E.labels(model_name=self.model_name).observe(e2e)
