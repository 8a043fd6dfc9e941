"""OpenAI request/response models (plus the vLLM extensions load clients send), validated by pydantic.

Unknown fields are a 400 naming the field, as OpenAI itself answers: a field we silently dropped could change the
output. Known fields crescent cannot honour yet are declared here and refused by
:mod:`crescent.services.gateway.unsupported` unless they hold their no-op value. Every integer that crosses into
a protobuf field is bounded by that field's range, and every string must be encodable as UTF-8 (JSON lets a client
send a lone surrogate ``"\\ud800"``; protobuf and the tokenizer cannot take it).
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, field_validator

MAX_STOP_STRINGS = 8
MAX_TOKEN_ID = 2**31  # ids travel as uint32; the worker checks them against its vocabulary
MAX_INT32 = 2**31 - 1
MAX_UINT32 = 2**32 - 1
MAX_LOGPROBS = 20  # the worker's cap (OpenAI's own on top_logprobs)


def _utf8(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode text (a lone UTF-16 surrogate is not)") from None
    return text


def _integral(value: object) -> object:
    """JSON Schema counts 2.0 as an integer (JSON has one number type); strict pydantic would not."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


Text = Annotated[str, AfterValidator(_utf8)]
Int = Annotated[int, BeforeValidator(_integral)]
TokenId = Annotated[Int, Field(ge=0, lt=MAX_TOKEN_ID)]


class _Request(BaseModel):
    # strict: a value of the wrong JSON type ("5" for an integer, 1.5 for n) is a 400, as the published schema says
    # (an integer still fills a float field)
    model_config = ConfigDict(extra="forbid", strict=True, protected_namespaces=())


class StreamOptions(_Request):
    include_usage: bool = False
    include_obfuscation: bool | None = None
    """OpenAI pads chunks against side channels; crescent sends no padding, which clients accept."""


class ContentPart(_Request):
    """One part of a message's content; only ``text`` parts are served (others: 400 in unsupported.py)."""

    model_config = ConfigDict(extra="allow")  # image_url, input_audio, file... carry their own fields
    type: Text
    text: Text | None = None


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[ContentPart] | None = None
    name: Text | None = None
    tool_call_id: Text | None = None
    tool_calls: list[dict[str, Any]] | None = None
    refusal: Text | None = None
    function_call: dict[str, Any] | None = None
    audio: dict[str, Any] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text or "" for part in self.content)


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


class _SamplingFields(_Request):
    model: Text = Field(min_length=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: Int | None = Field(None, ge=-1, le=MAX_INT32)
    n: Int = Field(1, ge=1, le=128)
    seed: Int | None = Field(None, ge=-(2**63), lt=2**63)  # int64, as OpenAI; sent as uint64 mod 2^64
    stop: Text | list[Text] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    min_tokens: Int = Field(0, ge=0, le=MAX_UINT32)
    ignore_eos: bool = False
    stop_token_ids: list[TokenId] | None = None
    skip_special_tokens: bool = True
    # accepted, no effect on the output
    user: Text | None = None
    metadata: dict[str, Text] | None = None
    store: bool | None = None
    service_tier: Text | None = None
    prompt_cache_key: Text | None = None
    safety_identifier: Text | None = None
    # declared so that unsupported.py can refuse them by name unless they hold their no-op value
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=100.0)
    logit_bias: dict[str, float] | None = None
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    best_of: Int | None = Field(None, ge=1, le=128)
    use_beam_search: bool = False
    length_penalty: float | None = None
    include_stop_str_in_output: bool = False
    response_format: ResponseFormat | None = None
    guided_json: Any = None
    guided_regex: Text | None = None
    guided_choice: list[Text] | None = None
    guided_grammar: Text | None = None
    structured_outputs: dict[str, Any] | None = None
    allowed_token_ids: list[TokenId] | None = None
    bad_words: list[Text] | None = None
    truncate_prompt_tokens: Int | None = Field(None, ge=-1, le=MAX_INT32)
    prompt_logprobs: Int | None = Field(None, ge=-1, le=MAX_LOGPROBS)
    return_tokens_as_token_ids: bool | None = None

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
    max_tokens: Int | None = Field(None, ge=1, le=MAX_UINT32)
    max_completion_tokens: Int | None = Field(None, ge=1, le=MAX_UINT32)
    logprobs: bool = False
    top_logprobs: Int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    parallel_tool_calls: bool | None = None  # false: tool_choice "auto" keeps only the first call
    prediction: dict[str, Any] | None = None  # predicted outputs change latency, never the output
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: Literal["none", "auto"] | dict[str, Any] | None = None
    modalities: list[Literal["text", "audio"]] | None = None
    audio: dict[str, Any] | None = None
    reasoning_effort: Text | None = None
    verbosity: Text | None = None
    web_search_options: dict[str, Any] | None = None
    echo: bool = False
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: Text | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    documents: list[dict[str, Any]] | None = None

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_SamplingFields):
    prompt: Text | list[Text] | list[TokenId] | list[list[TokenId]]
    max_tokens: Int | None = Field(16, ge=1, le=MAX_UINT32)
    logprobs: Int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    suffix: Text | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: object) -> object:
        if isinstance(v, list) and (not v or any(isinstance(p, list) and not p for p in v)):
            raise ValueError("prompt must not be empty (nor hold an empty token list)")
        return v

    def prompts(self) -> list[str | list[int]]:
        """The prompt as a list of prompts (a bare string or a single token-id list is one)."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]  # type: ignore[list-item]
        return list(p)  # type: ignore[arg-type]


class TokenizeRequest(_Request):
    """vLLM's ``POST /tokenize``: a ``prompt`` (as completions take it) or chat ``messages`` (as chat does)."""

    model: Text | None = None
    prompt: Text | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class DetokenizeRequest(_Request):
    """vLLM's ``POST /detokenize``."""

    model: Text | None = None
    tokens: list[TokenId]


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
