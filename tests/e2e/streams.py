"""What the kill -9 e2e tests share: a greedy stream's outcome as the client saw it, and when the cluster serves again."""

from __future__ import annotations

import time
from collections.abc import Callable

import openai

COUNT_PROMPT = [{"role": "user", "content": "Count from one to forty in words."}]


def stream_outcome(client: openai.OpenAI, model: str, max_tokens: int = 64,
                   on_chunk: Callable[[], None] | None = None) -> tuple[str, str]:
    """('done', text) when the stream finished normally, ('error', '') when it ended with an SSE error event (the
    API reported it), ('cut', '') when the connection dropped with neither: what must never happen.
    ``on_chunk``: called per content chunk (a test kills a worker once every stream is mid-way)."""
    try:
        stream = client.chat.completions.create(model=model, messages=COUNT_PROMPT, max_tokens=max_tokens,
                                                temperature=0, stream=True)
        parts, finished = [], []
        for c in stream:
            if c.choices:
                parts.append(c.choices[0].delta.content or "")
                finished += [c.choices[0].finish_reason] if c.choices[0].finish_reason else []
                if on_chunk is not None:
                    on_chunk()
        return ("done", "".join(parts)) if finished else ("cut", "")
    except openai.APIConnectionError:
        return "cut", ""
    except openai.APIError:
        return "error", ""


def first_success(client: openai.OpenAI, model: str, deadline: float) -> float:
    """When a short chat first succeeds (retrying every 0.5 s until ``deadline``)."""
    while True:
        try:
            reply = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "Say hi."}], max_tokens=4, temperature=0,
                timeout=20)
            assert reply.choices[0].message.content is not None
            return time.monotonic()
        except openai.APIError as exc:
            assert time.monotonic() < deadline, f"no request served before the deadline: {exc}"
            time.sleep(0.5)
