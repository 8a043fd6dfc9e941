"""Incremental detokenization and stop conditions for one request.

Text is decoded incrementally with vLLM's two-offset trick: decode ``tokens[prefix:read]`` and ``tokens[prefix:]``
and emit only the difference, and only when it does not end in U+FFFD (a UTF-8 character split across tokens is
held until its last byte arrives). A few prompt tokens seed the window so leading-space rules match a full decode.
Text that might be the start of a stop string is held back until it is known not to be.
"""

from __future__ import annotations

from typing import Protocol

from crescent.engine.sampling_params import SamplingParams

_CONTEXT_TOKENS = 5
_REPLACEMENT = "\ufffd"


class Decoder(Protocol):
    def decode(self, ids: list[int]) -> str: ...


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Decoder, prompt_ids: list[int], params: SamplingParams,
                 eos_token_ids: set[int] | frozenset[int] = frozenset()):
        self.tokenizer = tokenizer
        self.params = params
        self.stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_token_ids))
        self.max_stop_len = max((len(s) for s in params.stop), default=0)
        self.tokens = list(prompt_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.tokens)
        self.num_outputs = 0
        self.text = ""
        """The output text so far (a stop string and everything after it cut off)."""
        self.emitted = 0
        self.finish_reason: str | None = None

    def add(self, token_id: int) -> str | None:
        """Account one output token; returns "stop" or "length" when the request is done, else None."""
        if self.finish_reason is not None:
            raise RuntimeError("token added after the request finished")
        self.num_outputs += 1
        may_stop = self.num_outputs > self.params.min_tokens or self.num_outputs >= self.params.max_tokens
        if token_id in self.stop_ids and self.num_outputs > self.params.min_tokens:
            return self._finish("stop")  # the stop token's own text is not part of the output
        before = len(self.text)
        self.text += self._decode_next(token_id)
        if self.params.stop and may_stop and self._cut_at_stop_string(before):
            return self._finish("stop")
        if self.num_outputs >= self.params.max_tokens:
            return self._finish("length")
        return None

    def finish(self, reason: str) -> None:
        """End the request from outside (length limit of the model, abort)."""
        if self.finish_reason is None:
            self._finish(reason)

    def _finish(self, reason: str) -> str:
        self._flush()
        self.finish_reason = reason
        return reason

    def _decode_next(self, token_id: int) -> str:
        self.tokens.append(token_id)
        prefix_text = self.tokenizer.decode(self.tokens[self.prefix_offset:self.read_offset])
        new_text = self.tokenizer.decode(self.tokens[self.prefix_offset:])
        if len(new_text) > len(prefix_text) and not new_text.endswith(_REPLACEMENT):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.tokens)
            return new_text[len(prefix_text):]
        return ""

    def _flush(self) -> None:
        """At the end, emit whatever bytes are still pending (even an incomplete character)."""
        if self.read_offset < len(self.tokens):
            prefix_text = self.tokenizer.decode(self.tokens[self.prefix_offset:self.read_offset])
            new_text = self.tokenizer.decode(self.tokens[self.prefix_offset:])
            self.text += new_text[len(prefix_text):]
            self.read_offset = len(self.tokens)

    def _cut_at_stop_string(self, before: int) -> bool:
        start = max(0, before - self.max_stop_len + 1)
        found = [i for i in (self.text.find(s, start) for s in self.params.stop) if i >= 0]
        if not found:
            return False
        self.text = self.text[:min(found)]
        self.read_offset = len(self.tokens)  # nothing after a stop string is ever emitted
        return True

    def pop_text(self) -> str:
        """Text not returned before, holding back a tail that could still grow into a stop string."""
        end = len(self.text)
        if self.finish_reason is None and self.params.stop:
            end -= self._held_back()
        out = self.text[self.emitted:end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return out

    def _held_back(self) -> int:
        for n in range(min(self.max_stop_len - 1, len(self.text)), 0, -1):
            tail = self.text[-n:]
            if any(s.startswith(tail) for s in self.params.stop):
                return n
        return 0
