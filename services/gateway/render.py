"""OpenAI response and stream-chunk JSON for chat completions and text completions."""

from __future__ import annotations

import math

from crescent.proto.v1 import common_pb2
from crescent.services.gateway.generation import ChoiceState, Delta
from crescent.services.gateway.schema import envelope
from crescent.services.gateway.tokens import PromptEncoder
from crescent.services.gateway.tool_parsers import CallDelta, HermesParser, merge
from crescent.services.gateway.tools import ToolPlan, new_call_id

MIN_LOGPROB = -9999.0
"""What a -inf (or NaN) logprob is sent as, as vLLM does: JSON has no infinity, and strict parsers refuse it."""


def finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else MIN_LOGPROB


class ChatRenderer:
    object_full = "chat.completion"
    object_chunk = "chat.completion.chunk"

    def __init__(self, encoder: PromptEncoder, top_logprobs: int | None, tools: ToolPlan | None = None):
        self.encoder = encoder
        self.top_logprobs = top_logprobs  # None = logprobs off
        self.tools = tools if tools is not None and tools.calls else None
        """Set when the output is a tool call: rendered as tool_calls, not content."""
        self._call_ids: dict[int, str] = {}
        self._buffered: dict[int, str] = {}  # tool_choice "required": the name is known once the call is whole
        self._parsers: dict[int, HermesParser] = {}  # tool_choice "auto": one per choice

    def opening(self, n: int) -> list[dict]:
        """The first chunk of each choice carries the role (as OpenAI's streams do)."""
        content = None if self.tools and self.tools.forced else ""
        return [{"index": i, "delta": {"role": "assistant", "content": content}, "logprobs": None,
                 "finish_reason": None} for i in range(n)]

    def chunk_choice(self, delta: Delta) -> dict:
        body: dict = {"index": delta.index, "delta": {"content": delta.text} if delta.text else {},
                      "logprobs": self._logprobs(delta.logprobs), "finish_reason": delta.finish_reason}
        if self.tools and not self.tools.forced:
            body["delta"], body["finish_reason"] = self._auto_delta(delta)
        elif self.tools:
            body["delta"] = self._tool_delta(delta)
            body["finish_reason"] = _call_finish(delta.finish_reason)
        return body

    def _auto_delta(self, delta: Delta) -> tuple[dict, str | None]:
        """tool_choice "auto": content as it comes, each call's name once whole, then its argument fragments."""
        parser = self._parsers.setdefault(delta.index, self.tools.new_parser())
        parsed = parser.feed(delta.text)
        if delta.finish_reason is not None:
            parsed = merge([parsed, parser.finish()])
        out: dict = {"content": parsed.content} if parsed.content else {}
        if parsed.calls:
            out["tool_calls"] = [_auto_call(c) for c in parsed.calls]
        return out, _call_finish(delta.finish_reason) if parser.called else delta.finish_reason


    def _tool_delta(self, delta: Delta) -> dict:
        """Named function: its arguments stream as they come. "required": one delta with the whole call at the
        end (which function is called is only known once its JSON is complete)."""
        i = delta.index
        if self.tools.choice == "required":
            self._buffered[i] = self._buffered.get(i, "") + delta.text
            if delta.finish_reason is None:
                return {}
            name, args = self.tools.call_of(self._buffered.pop(i))
            return {"tool_calls": [self._call(i, name, args)]}
        if i not in self._call_ids:
            return {"tool_calls": [self._call(i, self.tools.choice, delta.text)]}
        return {"tool_calls": [{"index": 0, "function": {"arguments": delta.text}}]} if delta.text else {}

    def _call(self, i: int, name: str, arguments: str) -> dict:
        call_id = self._call_ids.setdefault(i, new_call_id())
        return {"index": 0, "id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}

    def full_choice(self, state: ChoiceState) -> dict:
        message: dict = {"role": "assistant", "content": state.text}
        finish = state.finish_reason
        if self.tools and not self.tools.forced:
            content, calls = self.tools.new_parser().parse_all(state.text)
            if calls:
                message = {"role": "assistant", "content": content or None, "tool_calls": [
                    {"id": new_call_id(), "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                    for c in calls]}
                finish = _call_finish(finish)
            else:
                message["content"] = content
        elif self.tools:
            name, args = self.tools.call_of(state.text)
            call = self._call(state.index, name, args)
            del call["index"]
            message, finish = {"role": "assistant", "content": None, "tool_calls": [call]}, _call_finish(finish)
        return {"index": state.index, "message": message, "logprobs": self._logprobs(state.logprobs),
                "finish_reason": finish}

    def _entry(self, token_id: int, logprob: float) -> dict:
        text = self.encoder.token_str(token_id)
        return {"token": text, "logprob": finite(logprob), "bytes": list(text.encode("utf-8"))}

    def _logprobs(self, logprobs: list[common_pb2.TokenLogprob]) -> dict | None:
        if self.top_logprobs is None:
            return None
        content = []
        for lp in logprobs:
            entry = self._entry(lp.token_id, lp.logprob)
            entry["top_logprobs"] = [self._entry(t.token_id, t.logprob) for t in lp.top[: self.top_logprobs]]
            content.append(entry)
        return {"content": content}


class CompletionRenderer:
    object_full = "text_completion"
    object_chunk = "text_completion"

    def __init__(self, encoder: PromptEncoder, logprobs: int | None, n_choices: int,
                 echo: list[str] | None = None):
        self.encoder = encoder
        self.logprobs = logprobs
        self._offsets = [0] * n_choices  # text_offset continues across a choice's chunks
        self._echo = list(echo) if echo is not None else None
        """echo=true: each choice's prompt text, sent before its first output (then cleared)."""

    def opening(self, n: int) -> list[dict]:
        return []

    def _echoed(self, index: int, text: str) -> str:
        if self._echo is None or not self._echo[index]:
            return text
        prompt, self._echo[index] = self._echo[index], ""
        return prompt + text

    def chunk_choice(self, delta: Delta) -> dict:
        return {"index": delta.index, "text": self._echoed(delta.index, delta.text),
                "logprobs": self._logprobs(delta.index, delta.logprobs), "finish_reason": delta.finish_reason}

    def full_choice(self, state: ChoiceState) -> dict:
        return {"index": state.index, "text": self._echoed(state.index, state.text),
                "logprobs": self._logprobs(state.index, state.logprobs), "finish_reason": state.finish_reason}

    def _logprobs(self, index: int, logprobs: list[common_pb2.TokenLogprob]) -> dict | None:
        if self.logprobs is None:
            return None
        tokens, values, tops, offsets = [], [], [], []
        for lp in logprobs:
            text = self.encoder.token_str(lp.token_id)
            tokens.append(text)
            values.append(finite(lp.logprob))
            tops.append({self.encoder.token_str(t.token_id): finite(t.logprob) for t in lp.top[: self.logprobs]})
            offsets.append(self._offsets[index])
            self._offsets[index] += len(text)
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def _auto_call(call: CallDelta) -> dict:
    """A streamed call delta: the first of a call has its id, type and name; later ones add arguments."""
    if call.name is None:
        return {"index": call.index, "function": {"arguments": call.arguments}}
    return {"index": call.index, "id": new_call_id(), "type": "function",
            "function": {"name": call.name, "arguments": call.arguments}}


def _call_finish(reason: str | None) -> str | None:
    return "tool_calls" if reason == "stop" else reason


def chunk(renderer: ChatRenderer | CompletionRenderer, request_id: str, model: str, created: int,
          choices: list[dict], include_usage: bool) -> dict:
    body = envelope(renderer.object_chunk, request_id, model, choices, created)
    if include_usage:
        body["usage"] = None  # OpenAI sends null usage on every chunk but the last when include_usage is on
    return body
