"""OpenAI request/response models (the subset crescent serves), validated by pydantic.

Unknown fields are ignored (clients send many optional ones); fields we accept but cannot honour are rejected
with a 400 in routes, never silently dropped when they change the output.
"""

from __future__ import annotations

import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_STOP_STRINGS = 8
MAX_TOKEN_ID = 2**31  # ids travel as uint32; the worker checks them against its vocabulary


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())


class StreamOptions(_Request):
    include_usage: bool = False


class TextPart(_Request):
    type: Literal["text"] = "text"
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class _SamplingFields(_Request):
    model: str = Field(min_length=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)
    n: int = Field(1, ge=1)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    user: str | None = None

    @field_validator("stop_token_ids")
    @classmethod
    def _stop_ids(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and any(not 0 <= t < MAX_TOKEN_ID for t in v):
            raise ValueError("stop_token_ids must be token ids >= 0")
        return v

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> list[str] | None:
        if v is None:
            return None
        stops = [v] if isinstance(v, str) else v
        if len(stops) > MAX_STOP_STRINGS or any(not s for s in stops):
            raise ValueError(f"stop must be up to {MAX_STOP_STRINGS} non-empty strings")
        return stops

    def stop_list(self) -> list[str]:
        return list(self.stop or [])  # type: ignore[arg-type]


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: object) -> object:
        if isinstance(v, list) and not v:
            raise ValueError("prompt must not be empty")
        lists = [v] if isinstance(v, list) and isinstance(v[0], int) else (v if isinstance(v, list) else [])
        for ids in lists:
            if isinstance(ids, list) and (not ids or any(not 0 <= t < MAX_TOKEN_ID for t in ids)):
                raise ValueError("a token-id prompt must be a non-empty list of ids >= 0")
        return v


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def envelope(kind: str, request_id: str, model: str, choices: list[dict], created: int | None = None) -> dict:
    """The fields every (chunk of a) response shares."""
    return {"id": request_id, "object": kind, "created": created or int(time.time()), "model": model,
            "choices": choices}


def model_card(model_id: str, max_model_len: int) -> dict:
    return {"id": model_id, "object": "model", "created": 0, "owned_by": "crescent", "max_model_len": max_model_len}
