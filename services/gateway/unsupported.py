"""Fields crescent declares but cannot honour yet: a 400 naming the field unless the value is a no-op.

Each of these changes the output (penalties, biases, structured output, tools, beam search...), so answering 200
without applying it would be a silent lie. When the engine learns one, drop its line here and wire it through
``routes._sampling``. The answer mirrors OpenAI's for a parameter a model does not support:
``{"param": "<field>", "code": "unsupported_parameter"}``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from crescent.services.gateway.errors import ApiError
from crescent.services.gateway.schema import ChatCompletionRequest, ChatMessage, _SamplingFields


def _unset(v: Any) -> bool:
    return v is None or v == [] or v == {}


def _equals(*noop: Any) -> Callable[[Any], bool]:
    return lambda v: v is None or v in noop


# field -> "this value changes nothing" (fields a request class lacks are skipped)
_NOOP: dict[str, Callable[[Any], bool]] = {
    "min_p": _equals(0.0),
    "use_beam_search": _equals(False),
    "length_penalty": _equals(1.0),
    "include_stop_str_in_output": _equals(False),
    "skip_special_tokens": _equals(True),
    "guided_json": _unset,
    "guided_regex": _unset,
    "guided_choice": _unset,
    "guided_grammar": _unset,
    "structured_outputs": _unset,
    "allowed_token_ids": _unset,
    "bad_words": _unset,
    "truncate_prompt_tokens": _unset,
    "prompt_logprobs": _unset,
    "return_tokens_as_token_ids": _equals(False),
    "functions": _unset,
    "function_call": _equals("none"),
    "modalities": lambda v: v is None or set(v) <= {"text"},
    "audio": _unset,
    "reasoning_effort": _unset,
    "verbosity": _unset,
    "web_search_options": _unset,
    "echo": _equals(False),
    "suffix": _equals(""),
    "add_generation_prompt": _equals(True),
    "continue_final_message": _equals(False),
    "chat_template": _unset,
    "chat_template_kwargs": _unset,
    "documents": _unset,
}
_SERVED = {"CompletionRequest": {"echo"}}
"""Fields of _NOOP one endpoint does serve (completions echoes its prompt; chat does not)."""
REFUSED_FIELDS = frozenset({*_NOOP, "best_of"})
"""Every request field refused unless at its no-op value."""
_MESSAGE_NOOP: dict[str, Callable[[Any], bool]] = {
    "refusal": _unset, "function_call": _unset, "audio": _unset,
}


def _refuse(param: str, what: str) -> ApiError:
    return ApiError(400, f"Unsupported parameter: {what} is not supported by this server yet; leave it out "
                         f"(or at its default)", param=param, code="unsupported_parameter")


def check_supported(body: _SamplingFields) -> None:
    """Raise a 400 naming the first field that asks for something the engine does not do."""
    fields = type(body).model_fields
    for name, is_noop in _NOOP.items():
        if name in _SERVED.get(type(body).__name__, ()):
            continue
        if name in fields and not is_noop(getattr(body, name)):
            raise _refuse(name, f"'{name}'")
    if body.best_of is not None and body.best_of != body.n:
        raise _refuse("best_of", "'best_of' other than n")
    if isinstance(body, ChatCompletionRequest):
        for i, message in enumerate(body.messages):
            check_message(i, message)


def check_message(i: int, message: ChatMessage) -> None:
    for name, is_noop in _MESSAGE_NOOP.items():
        if not is_noop(getattr(message, name)):
            raise _refuse(f"messages.{i}.{name}", f"'{name}' in a message")
    if isinstance(message.content, list):
        for j, part in enumerate(message.content):
            if part.type != "text":
                raise _refuse(f"messages.{i}.content.{j}", f"a content part of type {part.type!r} (only 'text')")
            if part.text is None:
                raise ApiError(400, "a text content part needs its 'text'", param=f"messages.{i}.content.{j}.text")
